//! The memory allocator of everything built on this crate: jemalloc.
//!
//! A boot storm allocates and frees a few small objects for every file of
//! every agent (the decoded request, the verdict sent back), on whichever
//! runtime thread runs the stream, and YARA-X allocates for every scan on
//! the scan threads. glibc's malloc locks the arena a block came from to
//! free it on another thread, and consolidates its free lists as it goes:
//! it took 11% of the server's CPU for one agent and 15% in a storm.
//! jemalloc's per-thread caches do neither (see BENCHMARKS.md,
//! "Allocator").
//!
//! Declared here, in the library, so that the binaries, the tests and the
//! benchmarks all run on the allocator that ships.

use tikv_jemallocator::Jemalloc;

#[global_allocator]
static ALLOCATOR: Jemalloc = Jemalloc;

/// jemalloc's options, read at its start (the symbol carries the prefix
/// `tikv-jemalloc-sys` gives jemalloc's). `oversize_threshold:0` keeps
/// blocks over 8 MiB (a `Lookup` of 100,000 digests) in the ordinary
/// arenas: by default they get an arena of their own that hands its memory
/// back to the system at once, so every such message faulted its pages in
/// anew, making `Lookup` 25 to 40% slower than with glibc. Freed memory
/// still goes back to the system by jemalloc's usual decay, over 10 s, as
/// the process goes on allocating (no background thread purges it).
///
/// A reference to an array, not a slice: one thin pointer, as C's
/// `const char *malloc_conf` expects.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: &[u8; 21] = b"oversize_threshold:0\0";
