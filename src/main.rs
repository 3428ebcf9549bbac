/// mimalloc instead of the system allocator: a worker allocates for every Redis reply and every
/// run it executes, small short-lived allocations that a thread-caching allocator serves best.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    stagecraft::cli::main()
}
