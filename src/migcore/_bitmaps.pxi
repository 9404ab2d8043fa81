# Dirty bitmaps: dirty_runs, set_bits, clear_bits, count_bits, and_bits, or_bits, andnot_bits.
#
# Bit i is bit i % 64 of word i // 64. Every kernel works a 64-bit word at a
# time; dirty_runs spends one load and test on a zero word and its real work
# on the set bits, so a sparse 2^28-bit bitmap takes milliseconds.
# The word helpers here (masks, popcount, array checks) also serve _hashing.pxi.

from libc.stdint cimport uint64_t
from libc.string cimport memset

import numpy as np

cdef extern from *:
    """
    #include <stdint.h>
    #include <stddef.h>

    /* ctz and popcount: compiler builtins where there are some, portable code elsewhere. */
    #if defined(__GNUC__) || defined(__clang__)
    #define MIG_CTZ64(x) ((size_t)__builtin_ctzll(x))
    #define MIG_POPCOUNT64(x) ((size_t)__builtin_popcountll(x))
    #else
    static size_t MIG_CTZ64(uint64_t x) {
        size_t n = 0;
        while (!(x & 1)) { x >>= 1; n++; }
        return n;
    }
    static size_t MIG_POPCOUNT64(uint64_t x) {
        x = x - ((x >> 1) & 0x5555555555555555ULL);
        x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
        x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
        return (size_t)((x * 0x0101010101010101ULL) >> 56);
    }
    #endif

    /* The POPCNT instruction where the CPU has it (chosen at run time, so the
       wheel stays portable); the builtin's generic code elsewhere. */
    #define MIG_POPCOUNT_LOOP(name, attr)                                   \\
        attr static size_t name(const uint64_t *w, size_t n) {             \\
            size_t total = 0;                                               \\
            for (size_t i = 0; i < n; i++) total += MIG_POPCOUNT64(w[i]);   \\
            return total;                                                   \\
        }
    MIG_POPCOUNT_LOOP(mig_popcount_generic, )
    #if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) \\
        && !defined(__APPLE__)
    MIG_POPCOUNT_LOOP(mig_popcount_hw, __attribute__((target("popcnt"))))
    static size_t mig_popcount_words(const uint64_t *w, size_t n) {
        return __builtin_cpu_supports("popcnt") ? mig_popcount_hw(w, n)
                                                : mig_popcount_generic(w, n);
    }
    #else
    #define mig_popcount_words mig_popcount_generic
    #endif
    """
    size_t MIG_CTZ64(uint64_t x) nogil
    size_t MIG_POPCOUNT64(uint64_t x) nogil
    size_t mig_popcount_words(const uint64_t *w, size_t n) nogil

cdef enum:
    # Words per chunk when a binary operation is followed by its popcount (stays in L1).
    _BITS_CHUNK = 1024

cdef object _U64_DTYPE = np.dtype(np.uint64)


cdef int _check_u64(object arr, str name, bint writable=False) except -1:
    """The reference's checks and error types: TypeError for the type, ValueError for the layout."""
    if not isinstance(arr, np.ndarray) or arr.dtype != _U64_DTYPE:
        raise TypeError(f"{name} must be a numpy uint64 array")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writable and not arr.flags.writeable:
        raise ValueError(f"{name} must be writable")
    return 0


cdef int _check_bitmap(object bitmap, Py_ssize_t nbits, str name, bint writable=False) except -1:
    _check_u64(bitmap, name, writable)
    if bitmap.ndim != 1 or bitmap.shape[0] * 64 < nbits:
        raise ValueError(f"{name} needs at least {-(-nbits // 64)} words for {nbits} bits")
    return 0


cdef inline uint64_t _low_mask(size_t first) noexcept nogil:
    """Bits ``first % 64`` and up of a word."""
    return (~<uint64_t>0) << (first & 63)


cdef inline uint64_t _high_mask(size_t stop) noexcept nogil:
    """Bits below ``stop`` within the word holding bit ``stop - 1``."""
    return (~<uint64_t>0) >> (63 - ((stop - 1) & 63))


cdef inline void _store_bits(uint64_t *words, size_t first, size_t stop,
                             uint64_t bits) noexcept nogil:
    """Write bits ``[first, stop)`` of one word (1 to 64 of them) and leave its other bits alone.

    One read-modify-write per word: callers build ``bits`` in a register first.
    """
    cdef uint64_t mask = _low_mask(first) & _high_mask(stop)
    cdef uint64_t *w = words + (first >> 6)
    w[0] = (w[0] & ~mask) | (bits & mask)


cdef inline size_t _next_set(const uint64_t *words, size_t i, size_t limit) noexcept nogil:
    """First set bit in ``[i, limit)``, or ``limit``; zero words cost one test each."""
    if i >= limit:
        return limit
    cdef size_t k = i >> 6
    cdef size_t last = (limit - 1) >> 6
    cdef uint64_t word = words[k] & _low_mask(i)
    while word == 0:
        if k == last:
            return limit
        k += 1
        word = words[k]
    i = (k << 6) + MIG_CTZ64(word)
    return i if i < limit else limit


cdef inline size_t _next_clear(const uint64_t *words, size_t i, size_t limit) noexcept nogil:
    """First clear bit in ``[i, limit)``, or ``limit``; full words cost one test each."""
    if i >= limit:
        return limit
    cdef size_t k = i >> 6
    cdef size_t last = (limit - 1) >> 6
    cdef uint64_t word = ~words[k] & _low_mask(i)
    while word == 0:
        if k == last:
            return limit
        k += 1
        word = ~words[k]
    i = (k << 6) + MIG_CTZ64(word)
    return i if i < limit else limit


cdef size_t _find_runs(const uint64_t *words, size_t nbits, uint64_t *out, size_t cap,
                       size_t *resume, size_t max_run) noexcept nogil:
    """Up to ``cap`` runs from bit ``resume[0]`` into ``out``; ``resume[0]`` ends where to go on."""
    cdef size_t i = resume[0]
    cdef size_t j, limit
    cdef size_t n = 0
    while True:
        i = _next_set(words, i, nbits)
        if i == nbits or n == cap:
            break
        limit = nbits if max_run == 0 or nbits - i <= max_run else i + max_run
        j = _next_clear(words, i, limit)
        out[2 * n] = i
        out[2 * n + 1] = j - i
        n += 1
        i = j
    resume[0] = i
    return n


cdef void _fill_bits(uint64_t *words, size_t start, size_t stop, bint value) noexcept nogil:
    """Set or clear bits ``[start, stop)``: masked edge words, memset between."""
    if start >= stop:
        return
    cdef size_t first = start >> 6
    cdef size_t last = (stop - 1) >> 6
    cdef uint64_t lo = _low_mask(start)
    cdef uint64_t hi = _high_mask(stop)
    if first == last:
        lo &= hi
    if value:
        words[first] |= lo
    else:
        words[first] &= ~lo
    if first == last:
        return
    if last > first + 1:
        memset(words + first + 1, 0xFF if value else 0, (last - first - 1) * sizeof(uint64_t))
    if value:
        words[last] |= hi
    else:
        words[last] &= ~hi


cdef enum _BitOp:
    _AND
    _OR
    _ANDNOT


cdef size_t _binary_words(const uint64_t *a, const uint64_t *b, uint64_t *out, size_t n,
                          _BitOp op) noexcept nogil:
    """``out = a op b`` in L1-sized chunks, each counted while hot; ``out`` may be ``a``/``b``."""
    cdef size_t done = 0
    cdef size_t total = 0
    cdef size_t i, m
    while done < n:
        m = n - done if n - done < _BITS_CHUNK else _BITS_CHUNK
        if op == _AND:
            for i in range(done, done + m):
                out[i] = a[i] & b[i]
        elif op == _OR:
            for i in range(done, done + m):
                out[i] = a[i] | b[i]
        else:
            for i in range(done, done + m):
                out[i] = a[i] & ~b[i]
        total += mig_popcount_words(out + done, m)
        done += m
    return total


def dirty_runs(bitmap, Py_ssize_t nbits, out, Py_ssize_t start=0, Py_ssize_t max_run=0):
    """Runs of set bits from ``start`` into ``out``; zero words are skipped a word at a time."""
    _check_bitmap(bitmap, nbits, "bitmap")
    _check_u64(out, "out", writable=True)
    if out.ndim != 2 or out.shape[1] != 2:
        raise ValueError("out must have shape (n, 2)")
    if not 0 <= start <= nbits:
        raise ValueError(f"start {start} outside 0..{nbits}")
    if max_run < 0:
        raise ValueError("max_run must be >= 0")
    cdef const uint64_t[::1] words = bitmap
    cdef uint64_t[:, ::1] rows = out
    cdef size_t cap = rows.shape[0]
    cdef size_t resume = start
    cdef size_t nruns = 0
    if nbits == 0:
        return 0, 0
    with nogil:
        nruns = _find_runs(&words[0], nbits, &rows[0, 0] if cap else NULL, cap, &resume, max_run)
    return nruns, resume


cdef int _check_bit_range(object bitmap, Py_ssize_t start, Py_ssize_t stop) except -1:
    _check_u64(bitmap, "bitmap", writable=True)
    if bitmap.ndim != 1 or not 0 <= start <= stop <= bitmap.shape[0] * 64:
        raise ValueError(f"bit range [{start}, {stop}) outside the bitmap")
    return 0


def set_bits(bitmap, Py_ssize_t start, Py_ssize_t stop):
    """Set bits ``[start, stop)`` word-wise (edges masked)."""
    _check_bit_range(bitmap, start, stop)
    if start == stop:
        return
    cdef uint64_t[::1] words = bitmap
    with nogil:
        _fill_bits(&words[0], start, stop, True)


def clear_bits(bitmap, Py_ssize_t start, Py_ssize_t stop):
    """Clear bits ``[start, stop)`` word-wise (edges masked)."""
    _check_bit_range(bitmap, start, stop)
    if start == stop:
        return
    cdef uint64_t[::1] words = bitmap
    with nogil:
        _fill_bits(&words[0], start, stop, False)


def count_bits(bitmap):
    """Set bits of the whole bitmap (any shape, like the reference)."""
    _check_u64(bitmap, "bitmap")
    cdef const uint64_t[::1] words = bitmap.reshape(-1)
    cdef size_t n = words.shape[0]
    cdef size_t total = 0
    if n == 0:
        return 0
    with nogil:
        total = mig_popcount_words(&words[0], n)
    return total


cdef object _binary(object a, object b, object out, _BitOp op):
    _check_u64(a, "a")
    _check_u64(b, "b")
    _check_u64(out, "out", writable=True)
    if not a.shape == b.shape == out.shape or a.ndim != 1:
        raise ValueError("a, b and out must be 1-D and the same length")
    cdef const uint64_t[::1] x = a
    cdef const uint64_t[::1] y = b
    cdef uint64_t[::1] z = out
    cdef size_t n = z.shape[0]
    cdef size_t total = 0
    if n == 0:
        return 0
    with nogil:
        total = _binary_words(&x[0], &y[0], &z[0], n, op)
    return total


def and_bits(a, b, out):
    """``out = a & b``; returns the set bits of ``out``."""
    return _binary(a, b, out, _AND)


def or_bits(a, b, out):
    """``out = a | b``; returns the set bits of ``out``."""
    return _binary(a, b, out, _OR)


def andnot_bits(a, b, out):
    """``out = a & ~b``; returns the set bits of ``out``."""
    return _binary(a, b, out, _ANDNOT)
