# Page hashing and zero pages: hash_pages, hash_runs, hash_delta, compare_hashes, zero_pages.
#
# XXH3_64bits comes from the system's xxhash.h, compiled in (XXH_INLINE_ALL),
# with its AVX2/AVX-512 loops picked at run time on x86; results are bit for
# bit those of ``xxhash.xxh3_64_intdigest``. Per-page flags are gathered 64 at
# a time in a register and stored with one masked write per word
# (``_store_bits`` in _bitmaps.pxi), so threads working on 64-page-aligned
# ranges never touch the same word.

from libc.stdint cimport uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* On x86 with GCC or Clang, also compile XXH3's AVX2 and AVX-512 loops
       (function target attributes, the header's own XXH_DISPATCH_* hooks, as
       its xxh_x86dispatch.c does) and pick one at run time, so a portable
       wheel still hashes at full speed. Elsewhere (macOS, whose toolchains
       differ in run-time CPU checks, and non-x86), or with an xxHash release
       whose internals we have not checked, plain XXH3_64bits is used. */
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) \\
        && !defined(__APPLE__)
    #define MIG_XXH3_DISPATCH 1
    #include <immintrin.h>
    #define XXH_X86DISPATCH
    #define XXH_DISPATCH_AVX2 1
    #define XXH_DISPATCH_AVX512 1
    #define XXH_TARGET_AVX2 __attribute__((__target__("avx2")))
    #define XXH_TARGET_AVX512 __attribute__((__target__("avx512f")))
    #endif
    #define XXH_INLINE_ALL
    #include <xxhash.h>

    typedef XXH64_hash_t (*mig_xxh3_fn)(const void *, size_t);

    #if defined(MIG_XXH3_DISPATCH) && XXH_VERSION_NUMBER >= 800 && XXH_VERSION_NUMBER < 900
    #if XXH_VERSION_NUMBER >= 802
    #define MIG_ACC_AVX2 XXH3_accumulate_avx2
    #define MIG_ACC_AVX512 XXH3_accumulate_avx512
    #else
    #define MIG_ACC_AVX2 XXH3_accumulate_512_avx2
    #define MIG_ACC_AVX512 XXH3_accumulate_512_avx512
    #endif
    /* Same result as XXH3_64bits: inputs up to XXH3_MIDSIZE_MAX take its scalar path. */
    #define MIG_XXH3_VARIANT(name, target, acc, scramble)                       \\
        XXH_NO_INLINE target XXH64_hash_t name(const void *p, size_t len) {      \\
            if (len <= XXH3_MIDSIZE_MAX) return XXH3_64bits(p, len);             \\
            return XXH3_hashLong_64b_internal(p, len, XXH3_kSecret,              \\
                                              sizeof(XXH3_kSecret), acc, scramble); \\
        }
    MIG_XXH3_VARIANT(mig_xxh3_avx2, XXH_TARGET_AVX2, MIG_ACC_AVX2, XXH3_scrambleAcc_avx2)
    MIG_XXH3_VARIANT(mig_xxh3_avx512, XXH_TARGET_AVX512, MIG_ACC_AVX512, XXH3_scrambleAcc_avx512)
    static XXH64_hash_t mig_xxh3_plain(const void *p, size_t len) { return XXH3_64bits(p, len); }

    /* Chosen per call (no module state); __builtin_cpu_supports also checks
       that the OS saves the wide registers. */
    static mig_xxh3_fn mig_xxh3_select(void) {
        if (__builtin_cpu_supports("avx512f")) return mig_xxh3_avx512;
        if (__builtin_cpu_supports("avx2")) return mig_xxh3_avx2;
        return mig_xxh3_plain;
    }
    /* One variant by name (0 plain, 1 AVX2, 2 AVX-512), NULL where this CPU or build lacks it:
       lets the tests check every compiled loop, not only the one this machine picks. */
    static mig_xxh3_fn mig_xxh3_variant(int which) {
        if (which == 0) return mig_xxh3_plain;
        if (which == 1 && __builtin_cpu_supports("avx2")) return mig_xxh3_avx2;
        if (which == 2 && __builtin_cpu_supports("avx512f")) return mig_xxh3_avx512;
        return NULL;
    }
    #else
    static XXH64_hash_t mig_xxh3_plain(const void *p, size_t len) { return XXH3_64bits(p, len); }
    static mig_xxh3_fn mig_xxh3_select(void) { return mig_xxh3_plain; }
    static mig_xxh3_fn mig_xxh3_variant(int which) { return which == 0 ? mig_xxh3_plain : NULL; }
    #endif

    /* All zero bytes? 256-byte blocks OR-reduced (the compiler vectorises the
       fixed inner loop) with an exit at the first non-zero block. */
    static int mig_is_zero(const unsigned char *p, size_t n) {
        size_t i = 0;
        uint64_t acc, w;
        if (n >= 8) {
            memcpy(&w, p, 8);
            if (w) return 0;
        }
        for (; i + 256 <= n; i += 256) {
            acc = 0;
            for (int k = 0; k < 32; k++) {
                memcpy(&w, p + i + 8 * k, 8);
                acc |= w;
            }
            if (acc) return 0;
        }
        for (; i < n; i++)
            if (p[i]) return 0;
        return 1;
    }
    """
    ctypedef uint64_t (*mig_xxh3_fn)(const void *data, size_t length) noexcept nogil
    mig_xxh3_fn mig_xxh3_select() nogil
    mig_xxh3_fn mig_xxh3_variant(int which) nogil
    bint mig_is_zero(const unsigned char *p, size_t n) nogil


cdef const unsigned char[::1] _hash_bytes(object buf):
    """Any C-contiguous buffer (any format or shape, read-only too) as bytes; reference's errors."""
    view = memoryview(buf)
    if not view.c_contiguous:
        raise ValueError("buffer must be C-contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


cdef size_t _hash_npages(size_t nbytes, Py_ssize_t page_size) except? 0:
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    return nbytes // <size_t>page_size + (nbytes % <size_t>page_size != 0)


cdef Py_ssize_t _hash_stop(size_t npages, Py_ssize_t start, Py_ssize_t stop) except -2:
    """Resolve ``stop=-1`` and check ``0 <= start <= stop <= npages``."""
    if stop == -1:
        stop = npages
    if not 0 <= start <= stop <= <Py_ssize_t>npages:
        raise ValueError(f"page range [{start}, {stop}) outside 0..{npages}")
    return stop


cdef int _hash_table(object arr, str name, size_t npages, bint writable) except -1:
    _check_u64(arr, name, writable)
    if arr.ndim != 1 or arr.shape[0] < npages:
        raise ValueError(f"{name} needs at least {npages} items")
    return 0


cdef inline size_t _page_len(size_t nbytes, size_t page_size, size_t i) noexcept nogil:
    """Bytes of page ``i``: ``page_size`` except for a partial last page."""
    cdef size_t left = nbytes - i * page_size
    return page_size if left > page_size else left


cdef void _hash_range(const unsigned char *p, size_t nbytes, size_t page_size,
                      uint64_t *out, size_t start, size_t stop) noexcept nogil:
    cdef mig_xxh3_fn xxh3 = mig_xxh3_select()
    cdef size_t i
    for i in range(start, stop):
        out[i] = xxh3(p + i * page_size, _page_len(nbytes, page_size, i))


cdef inline bint _absent(const uint64_t *resident, size_t i) noexcept nogil:
    """Page ``i`` is outside the ``resident`` bitmap (NULL: every page is resident)."""
    return resident != NULL and not ((resident[i >> 6] >> (i & 63)) & 1)


cdef size_t _delta_range(const unsigned char *p, size_t nbytes, size_t page_size,
                         uint64_t *baseline, uint64_t *dirty, size_t start, size_t stop,
                         bint update, const uint64_t *resident, uint64_t zero_hash,
                         uint64_t zero_tail_hash) noexcept nogil:
    """Hash, compare, set/clear the dirty bit, maybe update: one pass, one store per bitmap word.

    A page outside ``resident`` is known to hold zeros: it is not read, its hash is the zero hash.
    """
    cdef size_t i = start
    cdef size_t first, end
    cdef size_t count = 0
    cdef size_t last = (nbytes - 1) // page_size
    cdef uint64_t bits, h
    cdef mig_xxh3_fn xxh3 = mig_xxh3_select()
    while i < stop:
        first = i
        end = (i | 63) + 1
        if end > stop:
            end = stop
        bits = 0
        while i < end:
            if _absent(resident, i):
                h = zero_tail_hash if i == last else zero_hash
            else:
                h = xxh3(p + i * page_size, _page_len(nbytes, page_size, i))
            if h != baseline[i]:
                bits |= (<uint64_t>1) << (i & 63)
                if update:
                    baseline[i] = h
            i += 1
        _store_bits(dirty, first, end, bits)
        count += MIG_POPCOUNT64(bits)
    return count


cdef size_t _compare_range(const uint64_t *current, const uint64_t *baseline, uint64_t *dirty,
                           size_t n) noexcept nogil:
    cdef size_t i = 0
    cdef size_t first, end
    cdef size_t count = 0
    cdef uint64_t bits
    while i < n:
        first = i
        end = i + 64 if n - i > 64 else n
        bits = 0
        while i < end:
            bits |= (<uint64_t>(current[i] != baseline[i])) << (i & 63)
            i += 1
        _store_bits(dirty, first, end, bits)
        count += MIG_POPCOUNT64(bits)
    return count


cdef size_t _zero_range(const unsigned char *p, size_t nbytes, size_t page_size,
                        uint64_t *out, size_t start, size_t stop,
                        const uint64_t *resident) noexcept nogil:
    """Set the bit of every all-zero page; a page outside ``resident`` is zero without being read."""
    cdef size_t i = start
    cdef size_t first, end
    cdef size_t count = 0
    cdef uint64_t bits
    while i < stop:
        first = i
        end = (i | 63) + 1
        if end > stop:
            end = stop
        bits = 0
        while i < end:
            if _absent(resident, i) or mig_is_zero(p + i * page_size, _page_len(nbytes, page_size, i)):
                bits |= (<uint64_t>1) << (i & 63)
            i += 1
        _store_bits(out, first, end, bits)
        count += MIG_POPCOUNT64(bits)
    return count


cdef const uint64_t *_resident_words(object resident, size_t npages) except? NULL:
    """The ``resident`` bitmap's words, or NULL for None (every page resident)."""
    if resident is None:
        return NULL
    _check_bitmap(resident, npages, "resident")
    cdef const uint64_t[::1] words = resident
    if words.shape[0] == 0:
        return NULL  # no page at all: nothing will be read
    return &words[0]


def hash_pages(buf, Py_ssize_t page_size, out, Py_ssize_t start=0, Py_ssize_t stop=-1):
    """``out[i] = XXH3_64(page i)`` for ``[start, stop)``, the GIL released for the whole range."""
    cdef const unsigned char[::1] data = _hash_bytes(buf)
    cdef size_t nbytes = data.shape[0]
    cdef size_t npages = _hash_npages(nbytes, page_size)
    _hash_table(out, "out", npages, True)
    stop = _hash_stop(npages, start, stop)
    if start == stop:
        return
    cdef uint64_t[::1] table = out
    cdef const unsigned char *p = &data[0]
    with nogil:
        _hash_range(p, nbytes, page_size, &table[0], start, stop)


def hash_runs(buf, Py_ssize_t page_size, runs, out):
    """``out[i] = XXH3_64(page i)`` for the pages of ``runs``; every run is checked first."""
    cdef const unsigned char[::1] data = _hash_bytes(buf)
    cdef size_t nbytes = data.shape[0]
    cdef size_t npages = _hash_npages(nbytes, page_size)
    _check_u64(runs, "runs")
    if runs.ndim != 2 or runs.shape[1] != 2:
        raise ValueError("runs must have shape (n, 2)")
    cdef const uint64_t[:, ::1] rows = runs
    cdef size_t nruns = rows.shape[0]
    cdef size_t r
    cdef uint64_t first, count
    for r in range(nruns):
        first = rows[r, 0]
        count = rows[r, 1]
        if first > npages or count > npages - first:
            raise ValueError(f"run ({first}, {count}) outside the region's {npages} pages")
    _hash_table(out, "out", npages, True)
    if npages == 0:
        return
    cdef uint64_t[::1] table = out
    cdef const unsigned char *p = &data[0]
    with nogil:
        for r in range(nruns):
            _hash_range(p, nbytes, page_size, &table[0], rows[r, 0], rows[r, 0] + rows[r, 1])


def hash_delta(buf, Py_ssize_t page_size, baseline, dirty, Py_ssize_t start=0, Py_ssize_t stop=-1,
               bint update=False, resident=None):
    """Hash ``[start, stop)``, mark pages whose hash differs from ``baseline``; returns how many."""
    cdef const unsigned char[::1] data = _hash_bytes(buf)
    cdef size_t nbytes = data.shape[0]
    cdef size_t npages = _hash_npages(nbytes, page_size)
    _hash_table(baseline, "baseline", npages, update)
    _check_bitmap(dirty, npages, "dirty", writable=True)
    stop = _hash_stop(npages, start, stop)
    if start == stop:
        return 0
    # Without ``update`` the baseline is only read, so a read-only one is fine.
    cdef const uint64_t[::1] base = baseline
    cdef uint64_t[::1] bits = dirty
    cdef const unsigned char *p = &data[0]
    cdef const uint64_t *res = _resident_words(resident, npages)
    cdef mig_xxh3_fn xxh3 = mig_xxh3_select()
    cdef uint64_t zh = 0, zt = 0
    cdef size_t count
    if res != NULL:  # the hashes of a zero page and of a zero last page, for the pages not read
        zeros = bytes(<size_t>page_size)
        zh = xxh3(<const unsigned char *>zeros, <size_t>page_size)
        zt = xxh3(<const unsigned char *>zeros, _page_len(nbytes, page_size, npages - 1))
    with nogil:
        count = _delta_range(p, nbytes, page_size, <uint64_t *>&base[0], &bits[0], start, stop,
                             update, res, zh, zt)
    return count


def compare_hashes(current, baseline, dirty):
    """Bit ``i`` of ``dirty`` = ``current[i] != baseline[i]``; returns how many differ."""
    _check_u64(current, "current")
    _check_u64(baseline, "baseline")
    if current.ndim != 1 or baseline.ndim != 1 or baseline.shape[0] < current.shape[0]:
        raise ValueError("current and baseline must be 1-D, baseline at least as long")
    cdef size_t n = current.shape[0]
    _check_bitmap(dirty, n, "dirty", writable=True)
    if n == 0:
        return 0
    cdef const uint64_t[::1] cur = current
    cdef const uint64_t[::1] base = baseline
    cdef uint64_t[::1] bits = dirty
    cdef size_t count
    with nogil:
        count = _compare_range(&cur[0], &base[0], &bits[0], n)
    return count


def zero_pages(buf, Py_ssize_t page_size, out, Py_ssize_t start=0, Py_ssize_t stop=-1, resident=None):
    """Bit ``i`` of ``out`` = page ``i`` is all zero, for ``[start, stop)``; returns the count."""
    cdef const unsigned char[::1] data = _hash_bytes(buf)
    cdef size_t nbytes = data.shape[0]
    cdef size_t npages = _hash_npages(nbytes, page_size)
    _check_bitmap(out, npages, "out", writable=True)
    stop = _hash_stop(npages, start, stop)
    if start == stop:
        return 0
    cdef uint64_t[::1] bits = out
    cdef const unsigned char *p = &data[0]
    cdef const uint64_t *res = _resident_words(resident, npages)
    cdef size_t count
    with nogil:
        count = _zero_range(p, nbytes, page_size, &bits[0], start, stop, res)
    return count


_XXH3_VARIANTS = ("plain", "avx2", "avx512")


def _xxh3_variant(buf, str variant):
    """XXH3_64 of ``buf`` with one named compiled loop; None where this CPU or build lacks it (tests only)."""
    if variant not in _XXH3_VARIANTS:
        raise ValueError(f"variant must be one of {_XXH3_VARIANTS}")
    cdef mig_xxh3_fn fn = mig_xxh3_variant(_XXH3_VARIANTS.index(variant))
    if fn is NULL:
        return None
    cdef const unsigned char[::1] data = _hash_bytes(buf)
    cdef const unsigned char *p = &data[0] if data.shape[0] else <const unsigned char *>b""
    cdef size_t n = data.shape[0]
    cdef uint64_t h
    with nogil:
        h = fn(p, n)
    return h
