fn main() -> anyhow::Result<()> {
    stagecraft::cli::main()
}
