fn main() -> std::process::ExitCode {
    trainyard::cli::main()
}
