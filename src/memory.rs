//! Process-wide allocator settings. Training allocates and frees the same large
//! tensors every step; glibc returns each freed block over its mmap threshold to the
//! kernel and the next step faults every page back in (zeroed), which costs more than
//! the arithmetic on a small model. Keeping freed memory in the heap lets the next step
//! reuse it. Peak memory is unchanged: only what was already peak is kept.

/// Keeps freed large blocks for reuse (glibc: no mmap'd blocks, `M_MMAP_MAX` 0 — the
/// mmap threshold cannot go past 32 MiB, and one chunk of logits is that big — and
/// `M_TRIM_THRESHOLD` at 1 GiB) in one arena (`M_ARENA_MAX` 1: training runs on rayon's
/// threads, and an arena per thread kept a peak's worth each — reference model peak RSS
/// 444–580 MiB against 354–368 with one); nothing elsewhere. Call once, before the work
/// starts.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_MAX: i32 = -4;
        const M_ARENA_MAX: i32 = -8;
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        // SAFETY: mallopt only changes glibc's allocator parameters; a refused value
        // (0 returned) leaves the defaults, which are correct, only slower.
        unsafe {
            mallopt(M_MMAP_MAX, 0);
            mallopt(M_TRIM_THRESHOLD, 1 << 30);
            mallopt(M_ARENA_MAX, 1);
        }
    }
}
