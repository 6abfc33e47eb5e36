//! The docs against the code, with no broker or database: every Rust snippet of the
//! README and docs/ is part of a compiled example, and the reference's table of
//! variables and flags is the one list the code, `taskmill worker --help` and every
//! page agree with.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
}

/// README.md and every page under docs/.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md")];
    for entry in fs::read_dir(root().join("docs")).expect("docs/") {
        let path = entry.expect("docs entry").path();
        if path.extension().is_some_and(|ext| ext == "md") {
            pages.push(path);
        }
    }
    pages.sort();
    pages
}

/// Files under `dir` (recursively) whose name ends with `suffix`.
fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).expect("a folder") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            found.extend(files(&path, suffix));
        } else if path.to_string_lossy().ends_with(suffix) {
            found.push(path);
        }
    }
    found
}

/// The ```rust blocks of a page, each as its lines.
fn rust_blocks(page: &str) -> Vec<Vec<&str>> {
    let mut blocks = Vec::new();
    let mut current: Option<Vec<&str>> = None;
    for line in page.lines() {
        match current.as_mut() {
            None if line.trim_start().starts_with("```rust") => current = Some(Vec::new()),
            None => {}
            Some(_) if line.trim_start().starts_with("```") => {
                blocks.push(current.take().expect("an open block"))
            }
            Some(block) => block.push(line),
        }
    }
    blocks
}

/// Where `piece`'s lines first follow one another in `lines` from `from` on,
/// indentation aside.
fn find_lines(lines: &[&str], piece: &[&str], from: usize) -> Option<usize> {
    (from..=lines.len().saturating_sub(piece.len())).find(|&start| {
        lines[start..start + piece.len()]
            .iter()
            .zip(piece)
            .all(|(line, wanted)| line.trim() == wanted.trim())
    })
}

#[test]
fn every_rust_snippet_is_part_of_a_compiled_example() {
    let examples: Vec<(PathBuf, String)> = files(&root().join("examples"), ".rs")
        .into_iter()
        .map(|path| {
            let text = read(&path);
            (path, text)
        })
        .collect();
    let mut checked = 0;
    for page in pages() {
        let text = read(&page);
        for block in rust_blocks(&text) {
            // A snippet shows an example's pieces with the lines between them left out:
            // each piece (between blank lines) must be in the same example, in order.
            let pieces: Vec<&[&str]> = block.split(|line| line.trim().is_empty()).collect();
            let found = examples.iter().any(|(_, example)| {
                let lines: Vec<&str> = example.lines().collect();
                let mut from = 0;
                pieces
                    .iter()
                    .all(|piece| match find_lines(&lines, piece, from) {
                        Some(start) => {
                            from = start + piece.len();
                            true
                        }
                        None => false,
                    })
            });
            assert!(
                found,
                "a Rust snippet of {} is in no example under examples/ (each piece between \
                 blank lines must appear there line for line, in order):\n{}",
                page.display(),
                block.join("\n")
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} snippets found");
}

/// One row of the reference's table: the variable and the flags named for it.
struct Row {
    variable: String,
    flags: Vec<String>,
}

fn reference_rows() -> Vec<Row> {
    let reference = read(&root().join("docs/reference.md"));
    let table = reference
        .split("## Configuration")
        .nth(1)
        .expect("docs/reference.md has a Configuration section");
    table
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            Row {
                variable: cells[1].trim_matches('`').to_owned(),
                flags: cells[2]
                    .split(',')
                    .map(|flag| flag.trim().trim_matches('`').to_owned())
                    .filter(|flag| flag.starts_with("--"))
                    .collect(),
            }
        })
        .collect()
}

/// The environment variables named as string literals in `text`.
fn variables_read(text: &str) -> BTreeSet<String> {
    text.split('"')
        .skip(1)
        .step_by(2)
        .filter(|literal| is_variable(literal))
        .map(str::to_owned)
        .collect()
}

fn is_variable(word: &str) -> bool {
    matches!(word, "AMQP_URL" | "DATABASE_URL" | "RUST_LOG")
        || (word.starts_with("TASKMILL_")
            && word.len() > "TASKMILL_".len()
            && word.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
}

/// The `TASKMILL_*` words of `text`.
fn variables_named(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|word| word.starts_with("TASKMILL_") && is_variable(word))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_reference_lists_every_variable_the_code_reads_and_no_other() {
    let listed: BTreeSet<String> = reference_rows()
        .into_iter()
        .map(|row| row.variable)
        .collect();
    let bench = root().join("src/cli/bench");
    let mut read_by_pods = BTreeSet::new();
    let mut read_by_bench = BTreeSet::new();
    for file in files(&root().join("src"), ".rs") {
        let found = variables_read(&read(&file));
        if file.starts_with(&bench) {
            read_by_bench.extend(found);
        } else {
            read_by_pods.extend(found);
        }
    }
    let unlisted: Vec<_> = read_by_pods.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "read but not in docs/reference.md: {unlisted:?}"
    );
    let unread: Vec<_> = listed.difference(&read_by_pods).collect();
    assert!(
        unread.is_empty(),
        "in docs/reference.md but read nowhere: {unread:?}"
    );

    let benchmarks = read(&root().join("docs/benchmarks.md"));
    for variable in read_by_bench.difference(&listed) {
        assert!(
            benchmarks.contains(variable.as_str()),
            "taskmill bench reads {variable}, which docs/benchmarks.md does not name"
        );
    }
    let scripts: String = files(&root().join("scripts"), "")
        .iter()
        .map(|path| fs::read_to_string(path).unwrap_or_default())
        .collect();
    for page in pages() {
        for variable in variables_named(&read(&page)) {
            assert!(
                listed.contains(&variable)
                    || read_by_bench.contains(&variable)
                    || scripts.contains(&variable),
                "{} names {variable}, which nothing reads",
                page.display()
            );
        }
    }
}

#[test]
fn every_flag_in_the_reference_is_one_taskmill_worker_takes() {
    let help = Command::new(env!("CARGO_BIN_EXE_taskmill"))
        .args(["worker", "--help"])
        .output()
        .expect("run taskmill worker --help");
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    let taken: BTreeSet<&str> = help
        .split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '<')
        .filter(|word| word.starts_with("--"))
        .collect();
    for row in reference_rows() {
        for flag in &row.flags {
            assert!(
                taken.contains(flag.as_str()),
                "docs/reference.md gives {} the flag {flag}, which taskmill worker does not take",
                row.variable
            );
        }
    }
}
