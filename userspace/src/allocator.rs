//! The daemon's allocator: mimalloc, without the aligned-allocation detour
//! the `mimalloc` crate takes for every block.

use std::{
    alloc::{GlobalAlloc, Layout},
    ffi::c_void,
};

use libmimalloc_sys::{
    mi_free, mi_malloc, mi_malloc_aligned, mi_realloc, mi_realloc_aligned, mi_zalloc,
    mi_zalloc_aligned,
};

/// mimalloc, asked as C asks it: plain `mi_malloc` where a block's own
/// alignment is enough (as std's `System` does with malloc). The `mimalloc`
/// crate asks for every block by `mi_malloc_aligned`, whose fast path in
/// mimalloc 3 covers blocks up to 1 KiB only: a larger one whose size is
/// not a power of two (a read buffer, a header map) took the
/// over-allocating path, 220 instructions instead of about 30, three times
/// a request (callgrind, docs/benchmarks.md).
pub struct MiMalloc;

/// What every `mi_malloc` block is aligned to: its sizes are whole words
/// (24-byte blocks exist, so not 16).
const MI_MALLOC_ALIGN: usize = 8;

/// Whether a `mi_malloc` block is aligned to `align`.
fn natural(align: usize) -> bool {
    align <= MI_MALLOC_ALIGN
}

/// `plain` or `aligned` for `layout`, whichever its alignment calls for.
///
/// # Safety
/// As `GlobalAlloc::alloc`: `layout` has a non-zero size.
#[inline(always)]
unsafe fn by_alignment(
    layout: Layout,
    plain: unsafe extern "C" fn(usize) -> *mut c_void,
    aligned: unsafe extern "C" fn(usize, usize) -> *mut c_void,
) -> *mut u8 {
    // SAFETY: as the caller promised; both allocate `layout.size()` bytes.
    unsafe {
        if natural(layout.align()) {
            plain(layout.size()).cast()
        } else {
            aligned(layout.size(), layout.align()).cast()
        }
    }
}

// SAFETY: mimalloc's functions are thread-safe; each request either goes to
// the aligned call or to one whose blocks are aligned enough (`natural`),
// and `mi_free` frees blocks of both.
unsafe impl GlobalAlloc for MiMalloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as the trait requires (a non-zero size).
        unsafe { by_alignment(layout, mi_malloc, mi_malloc_aligned) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        unsafe { by_alignment(layout, mi_zalloc, mi_zalloc_aligned) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator.
        unsafe { mi_free(ptr.cast()) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator; the new block is aligned
        // as the old one had to be.
        unsafe {
            if natural(layout.align()) {
                mi_realloc(ptr.cast(), new_size).cast()
            } else {
                mi_realloc_aligned(ptr.cast(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fills `size` bytes at `p` with a pattern.
    ///
    /// # Safety
    /// `p` must be valid for `size` bytes of writes.
    unsafe fn fill(p: *mut u8, size: usize) {
        for i in 0..size {
            // SAFETY: as the caller promised.
            unsafe { *p.add(i) = i as u8 };
        }
    }

    /// Every block comes back as aligned as asked and keeps its bytes when
    /// it grows or shrinks, on both paths (at and above `MI_MALLOC_ALIGN`),
    /// for sizes around mimalloc's odd-word and small/large boundaries.
    #[test]
    fn blocks_are_aligned_and_keep_their_bytes() {
        let a = MiMalloc;
        for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
            for size in [
                1, 7, 8, 16, 24, 40, 56, 100, 1000, 1024, 1025, 1500, 5000, 70_000,
            ] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero sizes; every block is used within its
                // size and freed once, with its layout, by this allocator.
                unsafe {
                    let zeroed = a.alloc_zeroed(layout);
                    assert!(!zeroed.is_null());
                    assert_eq!(zeroed as usize % align, 0, "zeroed {size} at {align}");
                    assert!(
                        std::slice::from_raw_parts(zeroed, size)
                            .iter()
                            .all(|b| *b == 0)
                    );
                    a.dealloc(zeroed, layout);

                    for new_size in [size * 3 + 5, size.div_ceil(2)] {
                        let p = a.alloc(layout);
                        assert!(!p.is_null());
                        assert_eq!(p as usize % align, 0, "{size} at {align}");
                        fill(p, size);
                        let q = a.realloc(p, layout, new_size);
                        assert!(!q.is_null());
                        assert_eq!(q as usize % align, 0, "{size} -> {new_size} at {align}");
                        for i in 0..size.min(new_size) {
                            assert_eq!(*q.add(i), i as u8, "{size} -> {new_size} at {align}");
                        }
                        a.dealloc(q, Layout::from_size_align(new_size, align).unwrap());
                    }
                }
            }
        }
    }
}
