/// mimalloc instead of the system allocator: a worker allocates for every Redis reply and every
/// run it executes, and glibc's malloc was a quarter of its CPU time under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    stagecraft::cli::main()
}
