//! The `taskmill` binary: the command line lives in the library (`taskmill::cli`).

fn main() {
    std::process::exit(taskmill::cli::main())
}
