//! The bench's scratch database: a fresh PostgreSQL database on the configured server,
//! or a temporary SQLite file, so a benchmark never touches real jobs.

use sea_orm::{ConnectionTrait, Database};

pub struct Scratch {
    pub url: String,
    admin_url: Option<String>,
    name: String,
    file: Option<std::path::PathBuf>,
}

impl Scratch {
    pub async fn create(database_url: &str, run_id: &str) -> anyhow::Result<Self> {
        let name = format!("taskmill_bench_{run_id}");
        if database_url.starts_with("postgres") {
            let admin = Database::connect(database_url).await?;
            admin
                .execute_unprepared(&format!("CREATE DATABASE {name}"))
                .await?;
            admin.close().await?;
            let (base, _) = database_url
                .rsplit_once('/')
                .ok_or_else(|| anyhow::anyhow!("no database in {database_url}"))?;
            return Ok(Self {
                url: format!("{base}/{name}"),
                admin_url: Some(database_url.to_owned()),
                name,
                file: None,
            });
        }
        let file = std::env::temp_dir().join(format!("{name}.db"));
        Ok(Self {
            url: format!("sqlite://{}?mode=rwc", file.display()),
            admin_url: None,
            name,
            file: Some(file),
        })
    }

    pub async fn remove(&self) {
        if let Some(admin_url) = &self.admin_url {
            if let Ok(admin) = Database::connect(admin_url).await {
                let _ = admin
                    .execute_unprepared(&format!(
                        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                        self.name
                    ))
                    .await;
                let _ = admin.close().await;
            }
        }
        if let Some(file) = &self.file {
            for suffix in ["", "-wal", "-shm"] {
                let mut path = file.clone().into_os_string();
                path.push(suffix);
                let _ = std::fs::remove_file(path);
            }
        }
    }
}
