//! Memory held per buffered partial, as a shard holds them (`HashMap<String, Partial>`,
//! one part present): `cargo bench --bench partial_memory`.
//!
//! Prints, per partial, the bytes requested from the allocator (exact, counted by a
//! wrapping allocator) and the growth of resident memory (what the OS sees, allocator
//! overhead included), against the vector bytes it holds. The allocator is the one the
//! service runs with (mimalloc, `src/main.rs`).

use std::alloc::{GlobalAlloc, Layout};
use std::collections::HashMap;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use embedjoin::model::document::Partial;
use embedjoin::model::Part;
use mimalloc::MiMalloc;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|p| p.parse::<usize>().ok()).unwrap_or(0) * 4096
}

fn main() {
    // Resident memory never shrinks back: each dimension is measured in a fresh process.
    match std::env::args().skip(1).find_map(|a| a.strip_prefix("--dims=").and_then(|d| d.parse().ok())) {
        Some(dims) => measure(dims),
        None => {
            for dims in [384, 512] {
                let me = std::env::current_exe().expect("own path");
                let status = std::process::Command::new(me).arg(format!("--dims={dims}")).status().expect("runs");
                assert!(status.success());
            }
        }
    }
}

fn measure(dims: usize) {
    const N: usize = 200_000;
    {
        let (heap_before, rss_before) = (LIVE.load(Ordering::Relaxed), rss_bytes());
        let mut shard: HashMap<String, Partial> = HashMap::new();
        let now = Instant::now();
        for i in 0..N {
            // As ingress hands it over: an owned id and an exact-size vector.
            let part = Part::new(format!("sku-{i:08}"), 0, vec![i as f32; dims], None);
            let mut partial = Partial::new(2, now);
            let id = part.id.clone();
            partial.apply(part);
            shard.insert(id, partial);
        }
        let heap = (LIVE.load(Ordering::Relaxed) - heap_before) as f64 / N as f64;
        let rss = (rss_bytes() as f64 - rss_before as f64) / N as f64;
        let vector_bytes = (dims * 4) as f64;
        println!(
            "dims {dims}: vector {vector_bytes:.0} B; per buffered partial: heap {heap:.0} B = vector + {:.0} B, \
             resident {rss:.0} B = {:.3}x vector, i.e. vector + {:.0} B",
            heap - vector_bytes,
            rss / vector_bytes,
            rss - vector_bytes,
        );
        drop(shard);
    }
}
