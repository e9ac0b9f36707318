# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""The delta bitmap: the mechanism under every isc session.

Representation
--------------
Three bitmaps of one bit per chunk, each ``nwords = ceil(chunks / 64)`` uint64
words (chunk ``c`` is bit ``c & 63`` of word ``c >> 6``):

* ``_bits[_t]``      the **tracking** bitmap: chunks written since the last mark;
* ``_bits[1 - _t]``  the **transfer** bitmap: chunks still to copy for this mark;
* ``_saved``         chunks whose original data went to the save area (COFW).

Marking flips ``_t``: the roles swap in O(1), whatever the size.

Each bitmap carries a *summary*: one bit per block of 64 words (4096 chunks).
Invariant: a block holding any set bit has its summary bit set (the converse
may be false: clearing bits does not clear the summary until a scan finds the
block empty). Scans and merges visit only summary-dirty blocks, so an empty
16 TiB map at 2 KiB (2^33 chunks, 1 GiB of words) is scanned in microseconds.
Counts (``count``) are exact and kept incrementally.

Other invariants (checked by ``_check``): bits past ``chunks`` are zero;
``saved`` is a subset of ``transfer``; unmarked implies transfer and saved are
empty.

Worked example, 8 chunks, one mark::

    write chunks 1-2        tracking 01100000  transfer 00000000
    mark                    tracking 00000000  transfer 01100000   (swap)
    write chunk 2 (COFW)    tracking 00100000  transfer 01100000  saved 00100000
    send chunk 1            tracking 00100000  transfer 00100000  saved 00100000
    unmark                  tracking 01100000  transfer 00000000  saved 00000000

Cost: record_write O(words touched); mark O(1) (full mark O(n)); unmark
O(dirty blocks of tracking + saved); extents O(summary + dirty blocks);
test_and_clear O(1); counts O(1).

Memory: each bitmap is an anonymous mapping, so the untouched pages of a
huge, sparse map cost nothing; bitmaps of up to 16 MiB (2^27 chunks) ask for
transparent huge pages, so that random writes take no TLB miss. Emptying
long runs of whole pages (unmark, clear_tracking) gives them back to the
kernel instead of writing zeros.

Concurrency
-----------
One pthread mutex serializes every call, so each call is atomic with respect to
the others. The rule that keeps it deadlock-free: a thread never blocks on the
mutex while holding the GIL (``_acquire`` tries the lock, and on contention
releases the GIL before waiting). Long loops (batches, full marks, merges,
scans, copies) run with the GIL released and the mutex held.

``begin_write``/``end_write`` bracket a host write whose data I/O happens
between them. ``mark`` waits for such writes in flight to finish and holds off
new ones, so each write lands wholly before or wholly after a mark. A write
that overlaps a write in flight whose COFW data is still being saved waits for
it, so the save always reads the data as it was at the mark.

Persistence: dirty pages and snapshots
--------------------------------------
A checkpoint writes only what changed since the last one, as page records
(format in ``isc._layout``): the three *physical* arrays (``_bits[0]``,
``_bits[1]``, ``_saved``) cut into pages of 512 words (4 KiB), plus ``_t``,
so a mark or unmark changes no page. ``_dirty`` holds one bit per page, set
before any word of the page changes. ``snapshot`` freezes the state at an
instant in O(1): the dirty pages become *pending* and ``_dirty`` starts
empty (a base makes every page pending, in O(pages / 64)).
``snapshot_records`` then encodes the pending pages a few at a time (32, or
2048 empty ones a base leaves out), taking the mutex for each few: a host
write waits for one such hold at most. Between two holds a thread blocked on
the mutex gets it first (``_acquire`` counts them in ``_blocked``, and the
encoder waits on ``_cv`` until one of them has had it: an unlock and lock
again would win it back before the woken thread runs; for the same reason
``thaw`` returns only once each write it woke has had the mutex), and once 0.2 ms of
work ran since it last did (``YIELD_NS``), the encoder yields the CPU, so a
writer waiting for this CPU (one the encoder's wake-up preempted) runs then,
not at the next tick; yielding at every hold cost a busy CPU's checkpoint a
time slice per 32 pages. A write about
to change a pending page first encodes the page as it
was (copy on write, into ``_cow``): every record of a snapshot holds its page
as of the snapshot's instant, whenever it is taken. An abandoned snapshot
(``snapshot_end(False)``) forgets which pages differ from what was last
persisted, so the next snapshot is a *base*: every page that may hold a set
bit, to be replayed onto an empty map. A new bitmap's first snapshot is one.

Cost: a snapshot O(1) (a base O(pages / 64)); records O(pending pages) (a
base O(pages)); a change to a page pending in a snapshot O(page) once.

The save area's side
--------------------
``Slots`` is the save area's allocator (``isc.savearea`` describes it), and
``FileSave`` a session's COFW save for a file source and an in-memory save
area: ``write_through`` calls it without a Python call, and it ``pread``s
each chunk straight into its slot with the GIL released, handing anything
but a plain success to the session's Python save. ``SavedWrite`` is the
copy's side: it writes a run's saved chunks over the run's kernel copy in a
destination file, adjacent ones in one ``pwrite``, copying them out of the
area under its lock and writing after the lock, the GIL released for both,
and stops at anything but a plain success for the session's Python loop to
go on.
"""

from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort, realloc
from libc.string cimport memcmp, memcpy, memset

cimport numpy as cnp
from cpython.buffer cimport (PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release,
                             PyObject_GetBuffer)
from posix.types cimport off_t
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport pread, pwrite
from cpython.bytes cimport PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check
from cpython.number cimport PyNumber_Index
import numpy as np
from os import strerror as os_strerror

from isc import _layout

cnp.import_array()


cdef extern from "<sys/mman.h>" nogil:
    void *mmap(void *, size_t, int, int, int, long)
    int munmap(void *, size_t)
    int madvise(void *, size_t, int)
    int PROT_READ
    int PROT_WRITE
    int MAP_PRIVATE
    int MAP_ANONYMOUS
    int MADV_DONTNEED
    int MADV_HUGEPAGE
    void *MAP_FAILED


cdef extern from "<sched.h>" nogil:
    int sched_yield()


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *, void *)
    int pthread_mutex_destroy(pthread_mutex_t *)
    int pthread_mutex_lock(pthread_mutex_t *)
    int pthread_mutex_trylock(pthread_mutex_t *)
    int pthread_mutex_unlock(pthread_mutex_t *)
    int pthread_cond_init(pthread_cond_t *, void *)
    int pthread_cond_destroy(pthread_cond_t *)
    int pthread_cond_wait(pthread_cond_t *, pthread_mutex_t *)
    int pthread_cond_broadcast(pthread_cond_t *)


cdef extern from *:
    int popcount "__builtin_popcountll"(unsigned long long) nogil
    int ctz "__builtin_ctzll"(unsigned long long) nogil
    void prefetch "__builtin_prefetch"(const void *) nogil


cdef extern from *:
    """
    /* Sequentially consistent atomics for the writes-in-flight count and the
       mark-pending flag: a write without COFW data ends without the mutex. */
    static inline void isc_inc(unsigned long long *p) {
        __atomic_add_fetch(p, 1, __ATOMIC_SEQ_CST);
    }
    static inline int isc_dec_if_positive(unsigned long long *p) {
        unsigned long long n = __atomic_load_n(p, __ATOMIC_SEQ_CST);
        while (n) {
            if (__atomic_compare_exchange_n(p, &n, n - 1, 0, __ATOMIC_SEQ_CST,
                                            __ATOMIC_SEQ_CST))
                return 1;
        }
        return 0;
    }
    static inline unsigned long long isc_load(unsigned long long *p) {
        return __atomic_load_n(p, __ATOMIC_SEQ_CST);
    }
    static inline int isc_load_flag(int *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void isc_store_flag(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    /* The record count of the write log: stored after the record it counts. */
    static inline void isc_publish(unsigned long long *p, unsigned long long v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    """
    void isc_inc(uint64_t *) nogil
    bint isc_dec_if_positive(uint64_t *) nogil
    uint64_t isc_load(uint64_t *) nogil
    bint isc_load_flag(int *) nogil
    void isc_store_flag(int *, int) nogil
    void isc_publish(uint64_t *, uint64_t) nogil


cdef extern from *:
    """
    /* CRC-32 of page records: zlib's (IEEE 802.3, reflected), slice-by-8. */
    static uint32_t isc_crc_table[8][256];
    static void isc_crc_init(void) {
        for (uint32_t n = 0; n < 256; n++) {
            uint32_t c = n;
            for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            isc_crc_table[0][n] = c;
        }
        for (uint32_t n = 0; n < 256; n++)
            for (int k = 1; k < 8; k++)
                isc_crc_table[k][n] = isc_crc_table[0][isc_crc_table[k - 1][n] & 0xff]
                                      ^ (isc_crc_table[k - 1][n] >> 8);
    }
    static uint32_t isc_crc32(const unsigned char *p, size_t n) {
        uint32_t c = 0xFFFFFFFFu;
        uint64_t w;
        for (; n >= 8; p += 8, n -= 8) {
            memcpy(&w, p, 8);  /* little-endian, as the records are */
            w ^= c;
            c = isc_crc_table[7][w & 0xff] ^ isc_crc_table[6][(w >> 8) & 0xff]
                ^ isc_crc_table[5][(w >> 16) & 0xff] ^ isc_crc_table[4][(w >> 24) & 0xff]
                ^ isc_crc_table[3][(w >> 32) & 0xff] ^ isc_crc_table[2][(w >> 40) & 0xff]
                ^ isc_crc_table[1][(w >> 48) & 0xff] ^ isc_crc_table[0][w >> 56];
        }
        while (n--) c = isc_crc_table[0][(c ^ *p++) & 0xff] ^ (c >> 8);
        return c ^ 0xFFFFFFFFu;
    }
    """
    void isc_crc_init() nogil
    uint32_t isc_crc32(const unsigned char *, size_t) nogil


isc_crc_init()


cdef enum:
    BLOCK_SHIFT = 6          # 64 words per summary block
    STACK_CHUNKS = 512       # COFW results that fit without malloc: a 1 MiB write at 2 KiB
    PAGE_SHIFT = 9           # 512 words (4 KiB) per page
    PAGE_WORDS = 512
    RECORD_HEAD = 16         # crc u32, kind u32, page id u64
    RECORD_MASKS = 64        # 8 u64 masks of a sparse record
    MAX_RECORD = RECORD_HEAD + RECORD_MASKS + PAGE_WORDS * 8
    PAGES_PER_HOLD = 32      # pages a snapshot encodes per hold of the mutex
    EMPTY_PER_HOLD = 2048    # pages it looks at per hold (a base skips empty ones)
    YIELD_NS = 200000        # work between two yields of the CPU by a checkpoint
    HUGE_PAGE = 2 << 20      # a transparent huge page
    HUGE_ARRAYS = 16 << 20   # bitmaps up to this size ask for huge pages
    ZERO_BY_MADVISE = 256 << 10  # zeroed runs from this size go back to the kernel
    ZERO_PAGE = 0            # record kinds, as in isc._layout
    FULL_PAGE = 1
    SPARSE_PAGE = 2


cdef uint64_t ONES = <uint64_t>0xFFFFFFFFFFFFFFFF


cdef inline uint64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


cdef inline void _yield_due(uint64_t *since) noexcept nogil:
    """Yield the CPU if ``YIELD_NS`` of work ran since ``since`` (then restarted): a
    thread waiting for this CPU (a host writer) waits that long at most, and on a
    busy CPU the work does not wait a time slice per few pages."""
    if _now_ns() - since[0] >= YIELD_NS:
        sched_yield()
        since[0] = _now_ns()


cdef class FileSave  # write_through calls it without a Python call


cdef struct Bits:
    uint64_t *words
    uint64_t *summary
    uint64_t count


cdef struct Span:
    uint64_t lo
    uint64_t hi


cdef struct Runs:
    # extents() output: (first, count) pairs, plus the run being grown
    int64_t *data
    size_t n
    size_t cap
    uint64_t limit
    bint failed
    uint64_t start
    uint64_t length


cdef inline int64_t _i64(object value) except? -1:
    """An integer argument as int64: ``TypeError`` for non-integers (floats
    included), ``RangeError`` beyond 64 bits."""
    cdef int overflow = 0
    cdef long long number
    if not PyLong_Check(value):
        value = PyNumber_Index(value)
    # Not PyLong_AsLongLong: it takes a slow path for any value past 2**30.
    number = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow:
        raise _layout.RangeError(f"{value} is outside any LUN (it does not fit in 64 bits)")
    return number


cdef object _EMPTY = np.empty(0, dtype=np.int64)
_EMPTY.flags.writeable = False


cdef inline uint64_t _mask(uint64_t w, uint64_t wlo, uint64_t whi,
                           uint64_t lo, uint64_t hi) noexcept nogil:
    """Bits of word ``w`` that fall in the chunk range [lo, hi]."""
    cdef uint64_t m = ONES
    if w == wlo:
        m &= ONES << (lo & 63)
    if w == whi:
        m &= ONES >> (63 - (hi & 63))
    return m


cdef inline size_t _emit(int64_t *out, uint64_t w, uint64_t v) noexcept nogil:
    """Write the chunks of the set bits ``v`` of word ``w`` to ``out``, ascending;
    return how many.

    Each run of set bits is written by a counting loop the compiler
    vectorizes, not bit by bit: the COFW chunks of a write come in runs (at
    2 KiB a mean write lists ~150 of them).
    """
    cdef size_t n = 0
    cdef uint64_t t, x, length, first, j
    while v:
        t = ctz(v)
        x = v >> t
        length = 64 - t if x == ONES >> t else ctz(~x)
        first = (w << 6) + t
        for j in range(length):
            out[n + j] = <int64_t>(first + j)
        n += length
        v = 0 if t + length >= 64 else v & (ONES << (t + length))
    return n


cdef inline void _touch(uint64_t *summary, uint64_t wlo, uint64_t whi) noexcept nogil:
    """Flag the summary blocks that hold words wlo..whi as possibly dirty."""
    cdef uint64_t b
    for b in range(wlo >> BLOCK_SHIFT, (whi >> BLOCK_SHIFT) + 1):
        summary[b >> 6] |= (<uint64_t>1) << (b & 63)


cdef inline uint64_t _first_word(uint64_t block) noexcept nogil:
    return block << BLOCK_SHIFT


cdef class DeltaBitmap:
    """Tracking and transfer bitmaps of one incremental session, with COFW flags.

    ``DeltaBitmap(size, granularity=65536)``: ``size`` is the LUN size in bytes
    (> 0; the last chunk may be short), ``granularity`` the chunk size in bytes,
    a power of two from 2048 to 65536. Raises ``ParameterError`` (a
    ValueError) otherwise, ``TypeError`` for non-integers.

    All byte ranges are half-open ``[offset, offset + length)``; chunk ranges
    are ``[first, first + count)``. Methods that reject their input raise
    before changing anything. Every method is safe to call from many threads.

    As bitarray's and pyroaring's bitmaps: ``len(bitmap)`` is the number of
    chunks; ``==`` compares the size, granularity, mark, generation and the
    three bitmaps (not ``writes``), and a bitmap is unhashable; ``pickle``
    goes through ``to_bytes``/``from_bytes``; ``chunks_of(which)`` gives
    the set chunks of one bitmap, ``extents()`` the transfer bitmap's runs.
    """

    cdef uint64_t _size
    cdef uint64_t _chunks
    cdef uint64_t _nwords
    cdef uint64_t _nblocks
    cdef uint64_t _nsum
    cdef uint64_t _granularity
    cdef int _shift
    cdef Bits _bits[2]
    cdef Bits _saved
    cdef int _t
    cdef bint _marked
    cdef uint64_t _generation
    cdef uint64_t _writes
    cdef pthread_mutex_t _mu
    cdef pthread_cond_t _cv
    cdef bint _sync_ready
    cdef uint64_t _in_flight
    cdef int _marking
    cdef int _frozen
    cdef uint64_t *_hot
    cdef uint64_t *_written       # regions written since retire_hot
    # One bit per word of each (in the same allocation, after it): set when the
    # word may be non-zero, so a pass skips the words of regions never touched.
    cdef uint64_t *_hot_sum
    cdef uint64_t *_written_sum
    cdef uint64_t _rsum           # words of each summary
    cdef int _region_shift
    cdef uint64_t _nregions
    cdef uint64_t _hot_count
    cdef object _activity_log
    cdef object _write_log       # the buffer log_writes appends to (kept alive)
    cdef uint64_t *_wlog         # its memory: count, overflow, then (first, last) records
    cdef uint64_t _wlog_cap      # records it holds
    cdef Span *_saving
    cdef size_t _nsaving
    cdef size_t _capsaving
    # Persistence (see "dirty pages and snapshots" above). Page maps hold one
    # bit per page of the three physical arrays, _nmap words per array.
    cdef uint64_t _npages
    cdef size_t _wbytes          # bytes mapped for each array: whole pages
    cdef uint64_t _nmap
    cdef uint64_t *_dirty
    cdef uint64_t _ndirty
    cdef uint64_t *_pending
    cdef uint64_t _npending
    cdef uint64_t _cursor        # next page id a snapshot looks at
    cdef bint _snapping
    cdef bint _base_snapshot     # the open snapshot is a base
    cdef bint _everything        # the next snapshot must be a base
    cdef unsigned char *_cow     # records of pending pages copied before a change
    cdef size_t _ncow
    cdef size_t _capcow
    cdef size_t _cow_taken
    cdef bint _cow_failed
    # The mutex handed over between a snapshot's holds (snapshot_records):
    cdef uint64_t _blocked        # threads blocked in _acquire (atomic)
    cdef uint64_t _served         # acquisitions by such threads, under the mutex
    cdef int _handing             # snapshot_records calls waiting for one of them
    cdef uint64_t _waiting        # writes waiting in _record (frozen, marking, a save)
    cdef uint64_t _woken          # returns from that wait, under the mutex
    cdef int _thawing             # thaw calls waiting for the writes they woke
    cdef object _hold_hook        # tests: called at the end of each hold
    cdef bint _hooked

    def __cinit__(self, size, granularity=_layout.DEFAULT_GRANULARITY):
        cdef uint64_t chunks = _layout.check_geometry(size, granularity)
        self._size = size
        self._granularity = granularity
        self._shift = ctz(self._granularity)
        self._chunks = chunks
        self._nwords = (chunks + 63) >> 6
        self._nblocks = (self._nwords + 63) >> BLOCK_SHIFT
        self._nsum = (self._nblocks + 63) >> 6
        self._npages = (self._nwords + PAGE_WORDS - 1) >> PAGE_SHIFT
        self._wbytes = self._npages << (PAGE_SHIFT + 3)
        self._nmap = (self._npages + 63) >> 6
        self._everything = True
        self._dirty = <uint64_t *>calloc(3 * self._nmap, 8)
        self._pending = <uint64_t *>calloc(3 * self._nmap, 8)
        if not (self._alloc(&self._bits[0]) and self._alloc(&self._bits[1])
                and self._alloc(&self._saved)) or self._dirty == NULL or self._pending == NULL:
            raise MemoryError(
                f"cannot allocate a delta bitmap of {chunks} chunks "
                f"({3 * self._nwords * 8} bytes)"
            )
        if pthread_mutex_init(&self._mu, NULL) or pthread_cond_init(&self._cv, NULL):
            raise MemoryError("cannot initialise the delta bitmap's mutex")
        self._sync_ready = True

    cdef bint _alloc(self, Bits *bits) noexcept:
        # Anonymous memory: untouched pages of a huge, empty map cost nothing,
        # and pages (4 KiB, as the snapshots' own) align with the kernel's, so
        # whole zeroed ones can be handed back (_zero).
        cdef size_t length = self._wbytes + HUGE_PAGE
        cdef char *base = <char *>mmap(NULL, length, PROT_READ | PROT_WRITE,
                                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        cdef size_t head
        bits.summary = <uint64_t *>calloc(self._nsum, 8)
        if base == <char *>MAP_FAILED:
            return False
        # Aligned on a huge page, keeping only what the words need.
        head = (HUGE_PAGE - (<size_t>base & (HUGE_PAGE - 1))) & (HUGE_PAGE - 1)
        if head:
            munmap(base, head)
        if length - head > self._wbytes:
            munmap(base + head + self._wbytes, length - head - self._wbytes)
        bits.words = <uint64_t *>(base + head)
        if self._wbytes <= HUGE_ARRAYS:
            # Random writes into a small map take no TLB miss; a bigger one
            # stays in 4 KiB pages, so that a sparse map stays small.
            madvise(bits.words, self._wbytes, MADV_HUGEPAGE)
        return bits.summary != NULL

    cdef void _free(self, Bits *bits) noexcept:
        if bits.words != NULL:
            munmap(bits.words, self._wbytes)
        free(bits.summary)

    def __dealloc__(self):
        free(self._hot)
        free(self._written)
        self._free(&self._bits[0])
        self._free(&self._bits[1])
        self._free(&self._saved)
        free(self._saving)
        free(self._dirty)
        free(self._pending)
        free(self._cow)
        if self._sync_ready:
            pthread_cond_destroy(&self._cv)
            pthread_mutex_destroy(&self._mu)

    # -- locking ---------------------------------------------------------------
    cdef inline void _acquire(self) noexcept:
        # Never block on the mutex while holding the GIL: its holder may be
        # waiting for the GIL (e.g. to leave a nogil section).
        if pthread_mutex_trylock(&self._mu) != 0:
            isc_inc(&self._blocked)
            with nogil:
                pthread_mutex_lock(&self._mu)
                isc_dec_if_positive(&self._blocked)
                self._served += 1
                if self._handing:
                    pthread_cond_broadcast(&self._cv)

    cdef inline void _release(self) noexcept nogil:
        pthread_mutex_unlock(&self._mu)

    # -- dirty pages ---------------------------------------------------------------
    cdef inline Bits *_array(self, uint64_t a) noexcept nogil:
        """Physical array ``a``: 0 and 1 (tracking is ``_t``), 2 the saved flags."""
        return &self._saved if a == 2 else &self._bits[a]

    cdef inline void _changing(self, uint64_t a, uint64_t w) noexcept nogil:
        """Word ``w`` of physical array ``a`` is about to change: flag its page dirty,
        after copying it if the open snapshot still needs it as it is."""
        cdef uint64_t p = w >> PAGE_SHIFT
        cdef uint64_t i = a * self._nmap + (p >> 6)
        cdef uint64_t bit = (<uint64_t>1) << (p & 63)
        if self._npending and self._pending[i] & bit:
            self._copy_pending(a, p, i, bit)
        if not self._dirty[i] & bit:
            self._dirty[i] |= bit
            self._ndirty += 1

    cdef void _changing_range(self, uint64_t a, uint64_t w0, uint64_t w1) noexcept nogil:
        """``_changing`` for every page of words w0..w1 (inclusive)."""
        cdef uint64_t p
        for p in range(w0 >> PAGE_SHIFT, (w1 >> PAGE_SHIFT) + 1):
            self._changing(a, p << PAGE_SHIFT)

    cdef void _copy_pending(self, uint64_t a, uint64_t p, uint64_t i, uint64_t bit) noexcept nogil:
        """Encode pending page ``p`` of array ``a`` into ``_cow`` before it changes."""
        cdef size_t cap
        cdef unsigned char *grown
        self._pending[i] &= ~bit
        self._npending -= 1
        if self._ncow + MAX_RECORD > self._capcow:
            cap = max(2 * self._capcow, <size_t>(64 * MAX_RECORD))
            grown = <unsigned char *>realloc(self._cow, cap)
            if grown == NULL:
                # The snapshot lacks this page now: snapshot_records refuses to go on.
                self._cow_failed = True
                return
            self._cow = grown
            self._capcow = cap
        self._ncow += self._encode(a, p, self._cow + self._ncow)

    cdef size_t _encode(self, uint64_t a, uint64_t p, unsigned char *out) noexcept nogil:
        """Write page ``p`` of array ``a`` at ``out`` as a record; return its size.

        A base snapshot leaves zero pages out (it is replayed onto an empty
        map): the size is 0 then.
        """
        cdef Bits *bits = self._array(a)
        cdef uint64_t *words = bits.words + (p << PAGE_SHIFT)
        cdef uint64_t n = min(<uint64_t>PAGE_WORDS, self._nwords - (p << PAGE_SHIFT))
        cdef uint64_t blocks = (n + 63) >> 6
        # The page's 8 summary bits: a clean block is all zero, and is not read.
        cdef uint64_t dirty = bits.summary[p >> 3] >> ((p & 7) << 3) & 0xFF
        cdef uint64_t masks[8]
        cdef uint64_t i, j, m, v, end, any_set = 0
        cdef uint64_t last = ONES  # what the page's last word holds when every chunk is set
        cdef bint full = dirty == (<uint64_t>1 << blocks) - 1
        cdef uint32_t kind = SPARSE_PAGE
        cdef uint32_t crc
        cdef uint64_t ident = a * self._npages + p
        cdef size_t size = RECORD_HEAD
        if (p << PAGE_SHIFT) + n == self._nwords and self._chunks & 63:
            last = ONES >> (64 - (self._chunks & 63))
        memset(masks, 0, sizeof(masks))
        for j in range(blocks):
            if not dirty >> j & 1:
                continue
            end = min(64, n - (j << 6))
            m = 0
            for i in range(end):
                v = words[(j << 6) + i]
                m |= (<uint64_t>(v != 0)) << i
                full &= v == ONES or (j << 6) + i == n - 1
            masks[j] = m
            any_set |= m
        full = full and words[n - 1] == last
        if full:
            kind = FULL_PAGE
        elif not any_set:
            if self._base_snapshot:
                return 0
            kind = ZERO_PAGE
        else:
            memcpy(out + RECORD_HEAD, masks, RECORD_MASKS)
            size += RECORD_MASKS
            for j in range(8):
                m = masks[j]
                while m:
                    memcpy(out + size, &words[(j << 6) + ctz(m)], 8)
                    size += 8
                    m &= m - 1
        memcpy(out + 4, &kind, 4)
        memcpy(out + 8, &ident, 8)
        crc = isc_crc32(out + 4, size - 4)
        memcpy(out, &crc, 4)
        return size

    # -- attributes --------------------------------------------------------------
    @property
    def size(self):
        """LUN size in bytes."""
        return self._size

    @property
    def granularity(self):
        """Chunk size in bytes."""
        return self._granularity

    @property
    def chunks(self):
        """Number of chunks, ``ceil(size / granularity)``."""
        return self._chunks

    @property
    def marked(self):
        """True between ``mark`` and ``unmark``."""
        return self._marked

    @property
    def generation(self):
        """Number of marks so far."""
        return self._generation

    @property
    def writes(self):
        """Number of writes recorded since creation (not persisted).

        Counts every recorded range: host writes, and the ranges the
        library itself tracks again (after a failed copy, a rollback or
        crash recovery), which go through ``record_write(s)`` too.
        """
        return self._writes

    @property
    def tracking_count(self):
        """Number of set tracking bits, O(1)."""
        self._acquire()
        n = self._bits[self._t].count
        self._release()
        return n

    @property
    def transfer_count(self):
        """Number of set transfer bits, O(1)."""
        self._acquire()
        n = self._bits[1 - self._t].count
        self._release()
        return n

    @property
    def saved_count(self):
        """Number of chunks flagged saved in this mark, O(1)."""
        self._acquire()
        n = self._saved.count
        self._release()
        return n

    # -- the host write path -----------------------------------------------------
    cdef inline int _check_write(self, int64_t offset, int64_t length) except -1:
        if offset < 0 or length < 0 or <uint64_t>length > self._size \
                or <uint64_t>offset > self._size - <uint64_t>length:
            raise _layout.write_range_error(offset, length, self._size)
        return 0

    cdef size_t _record_locked(self, uint64_t lo, uint64_t hi, int64_t *out,
                               bint cofw=True) noexcept nogil:
        """Set tracking bits of chunks lo..hi; while marked and ``cofw``, flag and
        emit COFW chunks.

        ``out`` needs room for ``hi - lo + 1`` entries when it may be written.
        Returns the number of COFW chunks written to ``out``.
        """
        cdef Bits *track = &self._bits[self._t]
        cdef Bits *xfer = &self._bits[1 - self._t]
        cdef uint64_t wlo = lo >> 6
        cdef uint64_t whi = hi >> 6
        cdef uint64_t w, m, old, x, c
        cdef uint64_t added = 0
        cdef uint64_t flagged = ONES  # the tracking page last flagged dirty
        cdef size_t n = 0
        # Only unsaved transfer chunks need a COFW: none, and no transfer word is read.
        cdef bint save = self._marked and cofw and xfer.count > self._saved.count
        if save:
            # The words of a large map are cache misses: start them together,
            # the saved one too (a COFW writes it), at both ends of the range.
            prefetch(xfer.words + wlo)
            prefetch(track.words + wlo)
            prefetch(self._saved.words + wlo)
            if whi != wlo:
                prefetch(xfer.words + whi)
                prefetch(track.words + whi)
                prefetch(self._saved.words + whi)
        for w in range(wlo, whi + 1):
            m = _mask(w, wlo, whi, lo, hi)
            x = 0
            if save and xfer.summary[w >> 12] >> ((w >> BLOCK_SHIFT) & 63) & 1:
                # Read before the tracking word's branches, so that the two
                # cache misses of a large map overlap.
                x = xfer.words[w] & m
            old = track.words[w]
            if old & m != m:
                if w >> PAGE_SHIFT != flagged:
                    self._changing(self._t, w)
                    flagged = w >> PAGE_SHIFT
                track.words[w] = old | m
                added += popcount(m & ~old)
            if x:
                c = x & ~self._saved.words[w] if self._saved.count else x
                if c:
                    self._changing(2, w)
                    self._saved.words[w] |= c
                    self._saved.count += popcount(c)
                    _touch(self._saved.summary, w, w)
                    n += _emit(out + n, w, c)
        track.count += added
        _touch(track.summary, wlo, whi)
        return n

    cdef object _record(self, int64_t offset, int64_t length, bint in_flight, bint *cold=NULL,
                        int64_t *into=NULL, size_t *count=NULL):
        """record_write and begin_write: validate, record under the mutex, return COFW chunks.

        With ``cold`` given and activity tracked, sets it when the write
        touches a region that is not hot yet. With ``into`` (room for
        ``STACK_CHUNKS``) given, COFW chunks that fit there go there, their
        number to ``count``, and it returns None instead of an array.
        """
        cdef int64_t stack[STACK_CHUNKS]
        cdef int64_t *base = into if into != NULL else stack
        cdef int64_t *out = base
        cdef uint64_t lo, hi, span
        cdef size_t n = 0
        cdef bint wait
        self._check_write(offset, length)
        lo = <uint64_t>offset >> self._shift
        hi = (<uint64_t>offset + <uint64_t>(length if length else 1) - 1) >> self._shift
        span = hi - lo + 1
        self._acquire()
        try:
            if in_flight:
                wait = self._marking or self._frozen or self._overlaps_saving(lo, hi)
                if wait:
                    with nogil:
                        while self._marking or self._frozen \
                                or self._overlaps_saving(lo, hi):
                            self._waiting += 1
                            pthread_cond_wait(&self._cv, &self._mu)
                            self._waiting -= 1
                            self._woken += 1
                            if self._thawing:
                                pthread_cond_broadcast(&self._cv)
                if not self._reserve_saving():
                    raise MemoryError("cannot grow the list of writes in flight")
            if self._marked and span > STACK_CHUNKS:
                # Only a marked write can return COFW chunks: allocate then.
                out = <int64_t *>malloc(span * 8)
                if out == NULL:
                    out = base
                    raise MemoryError(f"cannot allocate the COFW list for {span} chunks")
            self._writes += 1
            if length:
                n = self._record_locked(lo, hi, out)
            if cold != NULL and self._region_shift and length:
                cold[0] = not self._all_hot(<uint64_t>offset, <uint64_t>length)
            if in_flight and length and self._wlog != NULL:
                self._log_write(lo, hi)
            if in_flight:
                isc_inc(&self._in_flight)
                if n:
                    self._saving[self._nsaving].lo = lo
                    self._saving[self._nsaving].hi = hi
                    self._nsaving += 1
        finally:
            self._release()
        if n and out == into:
            count[0] = n
            return None
        try:
            return _EMPTY if n == 0 else _array(out, n)
        finally:
            if out != base:
                free(out)

    def record_write(self, offset, length):
        """Record a host write of ``length`` bytes at ``offset``; return the COFW chunks.

        Sets the tracking bit of every chunk the range touches. While marked,
        returns the touched chunks whose transfer bit is set and which are not
        saved yet, ascending, and flags them saved: the caller copies their
        current (point-in-time) data to the save area before the write goes on.
        Unmarked, or with nothing to save, returns an empty read-only array.
        ``length == 0`` touches nothing. Raises ``RangeError`` (a ValueError)
        and changes nothing when the range is not inside ``[0, size)``.
        """
        cdef int64_t c_offset = _i64(offset)
        cdef int64_t c_length = _i64(length)
        return self._record(c_offset, c_length, False)

    def begin_write(self, offset, length):
        """``record_write`` for a host write whose data I/O follows; pair with ``end_write``.

        The write counts as in flight until ``end_write``: ``mark`` waits for
        it, so the write lands wholly before or after the mark. Waits (GIL
        released) while a mark is pending and while a write in flight that
        overlaps this range still has COFW chunks to save. Returns the COFW
        chunks like ``record_write``.
        """
        cdef int64_t c_offset = _i64(offset)
        cdef int64_t c_length = _i64(length)
        return self._begin(c_offset, c_length)

    def end_write(self, offset, length, bint cofw):
        """End a write started with ``begin_write(offset, length)``.

        ``cofw`` says whether ``begin_write`` returned any chunk. Wakes writes
        and marks waiting for this one. Raises ``StateError`` when no such
        write is in flight.
        """
        cdef int64_t c_offset = _i64(offset)
        cdef int64_t c_length = _i64(length)
        self._end_write(c_offset, c_length, cofw)

    def write_through(self, write, save, offset, data):
        """One host write: ``begin_write``, ``save(cofw_chunks)`` if any, ``write(offset, data)``,
        ``end_write``.

        ``data`` is any bytes-like object. The session's write path in one
        call, so a write pays for a single Python-level call into the core;
        the callbacks come first so ``functools.partial(write_through, write,
        save)`` makes a host write function with no Python frame of its own.
        Exceptions from ``save`` or ``write`` propagate after ``end_write``;
        when ``save`` raises, the write is not made and its COFW chunks lose
        their saved flags, so the next write to them saves them again (a
        chunk is flagged saved only while its save can still land).
        """
        cdef int64_t c_offset = _i64(offset)
        cdef Py_buffer view
        cdef Py_ssize_t length
        cdef int64_t chunks[STACK_CHUNKS]
        cdef int64_t *into = NULL
        cdef size_t n = 0
        if PyBytes_CheckExact(data):
            length = PyBytes_GET_SIZE(data)
        else:
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            length = view.len
            PyBuffer_Release(&view)
        if type(save) is FileSave:
            into = chunks  # a FileSave takes the chunks as they are: no array
        cofw = self._begin(c_offset, length, into, &n)
        try:
            if cofw is not _EMPTY:
                try:
                    if cofw is None:
                        (<FileSave>save)._save(chunks, n)
                    else:
                        save(cofw)
                except BaseException:
                    # The write is abandoned: its chunks keep their data, and
                    # a later write must save them again.
                    self._unflag(_array(chunks, n) if cofw is None else cofw)
                    raise
            write(offset, data)
        finally:
            self._end_write(c_offset, length, cofw is not _EMPTY)

    cdef object _begin(self, int64_t offset, int64_t length, int64_t *into=NULL,
                       size_t *count=NULL):
        """begin_write, plus the activity log: a write to a cold region is logged first.

        ``into`` and ``count`` as for ``_record``."""
        cdef bint cold = False
        cdef uint64_t first, last, region
        cofw = self._record(offset, length, True, &cold, into, count)
        if cold:
            first = <uint64_t>offset >> self._region_shift
            last = (<uint64_t>offset + <uint64_t>length - 1) >> self._region_shift
            try:
                self._activity_log(first, last)
            except BaseException:
                # The write is abandoned before its COFW: unflag its chunks.
                if cofw is not _EMPTY:
                    self._unflag(_array(into, count[0]) if cofw is None else cofw)
                self._end_write(offset, length, cofw is not _EMPTY)
                raise
            self._acquire()
            for region in range(first, last + 1):
                if not self._hot[region >> 6] >> (region & 63) & 1:
                    self._hot[region >> 6] |= (<uint64_t>1) << (region & 63)
                    self._hot_sum[region >> 12] |= (<uint64_t>1) << ((region >> 6) & 63)
                    self._hot_count += 1
            self._release()
        return cofw

    cdef int _unflag(self, object cofw) except -1:
        """Drop the saved flags of ``cofw``, COFW chunks of a write in flight whose
        save will not happen. Its span is still in ``_saving``, so no
        overlapping write flagged them meanwhile."""
        cdef const int64_t[::1] chunks = cofw
        cdef Py_ssize_t i
        cdef uint64_t c, bit
        self._acquire()
        for i in range(chunks.shape[0]):
            c = <uint64_t>chunks[i]
            bit = (<uint64_t>1) << (c & 63)
            if self._saved.words[c >> 6] & bit:
                self._changing(2, c >> 6)
                self._saved.words[c >> 6] &= ~bit
                self._saved.count -= 1
        self._release()
        return 0

    cdef bint _all_hot(self, uint64_t offset, uint64_t length) noexcept nogil:
        """Whether every region of the write is hot; flags them all written."""
        cdef uint64_t region
        cdef bint hot = True
        for region in range(offset >> self._region_shift,
                            ((offset + length - 1) >> self._region_shift) + 1):
            self._written[region >> 6] |= (<uint64_t>1) << (region & 63)
            self._written_sum[region >> 12] |= (<uint64_t>1) << ((region >> 6) & 63)
            if not self._hot[region >> 6] >> (region & 63) & 1:
                hot = False
        return hot

    cdef void _log_write(self, uint64_t lo, uint64_t hi) noexcept nogil:
        """Append chunks lo..hi to the write log, or flag it overflowed."""
        cdef uint64_t n = self._wlog[0]
        if n == self._wlog_cap:
            self._wlog[1] = 1
            return
        self._wlog[2 + 2 * n] = lo
        self._wlog[3 + 2 * n] = hi
        isc_publish(self._wlog, n + 1)

    def log_writes(self, buffer):
        """Append the chunks of every host write to ``buffer`` before the write proceeds.

        For a precise resend after the process dies: ``begin_write`` and
        ``write_through`` append ``(first_chunk, last_chunk)`` to ``buffer``,
        a writable buffer (a shared mapping of a file outlives the process),
        laid out as u64 words: the number of records, an overflow flag set
        when a record did not fit, then the records; the count is stored
        after the record it counts. The buffer's own count and flag are
        where appending goes on. ``None`` stops. Raises ``ParameterError``
        for a buffer not aligned on 8 bytes or shorter than 16.
        """
        cdef unsigned char[::1] view
        cdef uint64_t *words = NULL
        cdef uint64_t cap = 0
        if buffer is not None:
            buffer = memoryview(buffer).cast("B")
            view = buffer
            if view.shape[0] < 16 or <size_t>&view[0] & 7:
                raise _layout.ParameterError(
                    "the write log needs a buffer of at least 16 bytes, aligned on 8"
                )
            words = <uint64_t *>&view[0]
            cap = (view.shape[0] - 16) >> 4
        self._acquire()
        self._write_log = buffer
        self._wlog = words
        self._wlog_cap = cap
        self._release()

    def track_activity(self, region_size, log):
        """Log regions as they become hot, before the first write to them proceeds.

        For crash safety without a synchronous metadata write per host write
        (a write-intent log, as DRBD's activity log): ``begin_write`` and
        ``write_through`` call ``log(first_region, last_region)`` (region
        index = byte offset // ``region_size``) when a write touches a region
        that is not hot yet, and the write goes on only after ``log``
        returns; if ``log`` raises, the write is abandoned (its COFW chunks
        lose their saved flags) and the error propagates. ``region_size`` is
        a power of two, at least the granularity. Raises ``ParameterError``
        otherwise.
        """
        cdef uint64_t size = _i64(region_size)
        if size < self._granularity or size & (size - 1):
            raise _layout.ParameterError(
                f"region size must be a power of two >= the granularity "
                f"{self._granularity}, got {region_size}"
            )
        if not callable(log):
            raise TypeError("log must be callable")
        nregions = (self._size + size - 1) // size
        cdef uint64_t nwords = (nregions + 63) >> 6
        cdef uint64_t nsum = (nwords + 63) >> 6
        cdef uint64_t *hot = <uint64_t *>calloc(nwords + nsum, 8)
        cdef uint64_t *written = <uint64_t *>calloc(nwords + nsum, 8)
        if hot == NULL or written == NULL:
            free(hot)
            free(written)
            raise MemoryError(f"cannot allocate the activity bitmap of {nregions} regions")
        self._acquire()
        free(self._hot)
        free(self._written)
        self._hot = hot
        self._written = written
        self._hot_sum = hot + nwords
        self._written_sum = written + nwords
        self._rsum = nsum
        self._nregions = nregions
        self._hot_count = 0
        self._region_shift = ctz(size)
        self._activity_log = log
        self._release()

    def retire_hot(self, keep=None):
        """Forget the hot regions but those in ``keep``; return the ones forgotten.

        Call it while frozen, right after taking the state that covers every
        write so far (``freeze``, ``snapshot``, ``retire_hot``, ``thaw``): a
        later write to a retired region is logged again, and the caller must
        have logged the regions it keeps. ``keep`` (int64 region indices, or
        None for none) keeps only regions that are hot. Forgets which regions
        were written, too (``hot_regions``). Returns ascending int64 region
        indices: empty when activity is not tracked. Raises ``RangeError``
        for a region outside the LUN, changing nothing. O(regions / 4096 +
        regions hot, kept or written), in C.
        """
        cdef const int64_t[::1] kept = np.ascontiguousarray(
            np.empty(0, np.int64) if keep is None else keep, dtype=np.int64
        )
        cdef Py_ssize_t i
        cdef uint64_t s, w, c, words, region
        for i in range(kept.shape[0]):
            if kept[i] < 0 or <uint64_t>kept[i] >= self._nregions:
                raise _layout.RangeError(
                    f"region {kept[i]} is outside the LUN's {self._nregions} regions"
                )
        cdef int64_t *forgot = NULL
        cdef size_t n = 0
        self._acquire()
        if self._region_shift:
            # In C, not a list of Python ints: it runs while host writes are frozen.
            forgot = <int64_t *>malloc((self._hot_count + 1) * 8)
        if forgot != NULL:
            # The words the summaries flag, not every region's: O(regions / 4096 +
            # regions touched) while host writes are frozen.
            for s in range(self._rsum):
                words = self._written_sum[s]
                self._written_sum[s] = 0
                while words:
                    self._written[(s << 6) + ctz(words)] = 0
                    words &= words - 1
            # The kept regions that are hot, in the bitmap of written ones.
            for i in range(kept.shape[0]):
                region = <uint64_t>kept[i]
                self._written[region >> 6] |= self._hot[region >> 6] & \
                    ((<uint64_t>1) << (region & 63))
            self._hot_count = 0
            for s in range(self._rsum):
                words = self._hot_sum[s]
                self._hot_sum[s] = 0
                while words:
                    w = (s << 6) + ctz(words)
                    words &= words - 1
                    c = self._hot[w] & ~self._written[w]
                    while c:
                        forgot[n] = <int64_t>((w << 6) + ctz(c))
                        n += 1
                        c &= c - 1
                    self._hot[w] = self._written[w]
                    if self._hot[w]:
                        self._hot_sum[s] |= (<uint64_t>1) << (w & 63)
                    self._hot_count += popcount(self._written[w])
                    self._written[w] = 0
        self._release()
        if forgot == NULL:
            if self._region_shift:
                raise MemoryError("cannot allocate the list of retired regions")
            return np.empty(0, dtype=np.int64)
        try:
            return _array(forgot, n)
        finally:
            free(forgot)

    def hot_regions(self, bint written=False):
        """The hot regions, ascending int64 region indices; with ``written``, only those
        written since ``retire_hot`` (the ones worth keeping hot). Empty when activity is
        not tracked."""
        cdef int64_t *found = NULL
        cdef size_t n
        self._acquire()
        n = self._hot_in(written, NULL)
        found = <int64_t *>malloc((n + 1) * 8)
        if found != NULL:
            self._hot_in(written, found)
        self._release()
        if found == NULL:
            raise MemoryError(f"cannot allocate the list of {n} hot regions")
        try:
            return _array(found, n)
        finally:
            free(found)

    cdef size_t _hot_in(self, bint written, int64_t *out) noexcept nogil:
        """Count the hot regions (with ``written``, those written since ``retire_hot``)
        and, unless ``out`` is NULL, store them there ascending: a pass over the words
        the summaries flag. Called with the mutex held."""
        cdef uint64_t s, w, c, words
        cdef size_t n = 0
        if not self._region_shift:
            return 0
        for s in range(self._rsum):
            words = self._hot_sum[s] & (self._written_sum[s] if written else ONES)
            while words:
                w = (s << 6) + ctz(words)
                words &= words - 1
                c = self._hot[w] & (self._written[w] if written else ONES)
                if out == NULL:
                    n += popcount(c)
                    continue
                while c:
                    out[n] = <int64_t>((w << 6) + ctz(c))
                    n += 1
                    c &= c - 1
        return n

    def keep_hot(self, regions, when, double now, double horizon, capacity, limit,
                 bint grow):
        """The regions a checkpoint keeps hot, most recently written first (an LRU):
        ``(regions, when, capacity)``.

        ``regions`` (ascending int64) and ``when`` (float64: when each was last
        found written) are what the last call returned, or empty. The result
        holds the regions written since ``retire_hot`` (found written at
        ``now``), then those of ``regions`` written after ``horizon`` and not
        since, newest first; cut to ``capacity // 2``, returned ascending with
        their times. With ``grow``, a ``capacity`` they do not fit twice over
        doubles first, up to ``limit``; the capacity in force is returned.
        Costs a pass over one bit per 4096 regions and over the words of
        those written under the map's mutex, and O(k log k) for the k
        regions written or kept, all with the GIL released: a checkpoint
        holds it for O(1) steps, whatever the hot set.
        Raises ``ParameterError`` for arrays of different lengths or not
        ``0 <= capacity <= limit``, changing nothing.
        """
        cdef const int64_t[::1] old = np.ascontiguousarray(regions, dtype=np.int64)
        cdef const double[::1] seen = np.ascontiguousarray(when, dtype=np.float64)
        cdef int64_t cap = _i64(capacity)
        cdef int64_t most = _i64(limit)
        cdef size_t m = <size_t>old.shape[0]
        cdef size_t n = 0, older = 0, kept = 0, i, j = 0
        cdef Kept *out
        if <size_t>seen.shape[0] != m or not 0 <= cap <= most:
            raise _layout.ParameterError(
                f"keep_hot needs as many times as regions and 0 <= capacity <= limit, got "
                f"{m} regions, {seen.shape[0]} times, capacity {capacity} and limit {limit}")
        cdef int64_t *found
        self._acquire()
        with nogil:
            n = self._hot_in(True, NULL)
            found = <int64_t *>malloc((n + 1) * 8)
            out = <Kept *>malloc((n + m + 1) * sizeof(Kept))
            if found != NULL and out != NULL:
                self._hot_in(True, found)
                for i in range(n):
                    out[i].region = found[i]
                    out[i].when = now
            self._release()
            free(found)
            if found == NULL:
                free(out)
                out = NULL
            if out != NULL:
                # The earlier ones, not written since (a merge: both are ascending).
                for i in range(m):
                    while j < n and out[j].region < old[i]:
                        j += 1
                    if seen[i] > horizon and not (j < n and out[j].region == old[i]):
                        out[n + older].region = old[i]
                        out[n + older].when = seen[i]
                        older += 1
                qsort(out + n, older, sizeof(Kept), _newest_first)
                if grow and 2 * (n + older) > <uint64_t>cap:
                    cap = min(2 * cap, most)
                kept = min(n + older, <size_t>(cap // 2))
                if kept > n:  # the written ones alone are ascending already
                    qsort(out, kept, sizeof(Kept), _by_region)
        if out == NULL:
            raise MemoryError(f"cannot allocate the LRU of {n + m} regions")
        try:
            kept_regions = np.empty(kept, dtype=np.int64)
            kept_when = np.empty(kept, dtype=np.float64)
            _unzip(out, kept, kept_regions, kept_when)
        finally:
            free(out)
        return kept_regions, kept_when, cap

    @property
    def hot_count(self):
        """Number of hot regions (0 when activity is not tracked)."""
        return self._hot_count

    cdef int _end_write(self, int64_t offset, int64_t length, bint cofw) except -1:
        if not cofw:
            # Only a pending mark waits for a write without COFW data. The
            # decrement and the flag read are ordered against mark's flag
            # store and count read (seq_cst), so one side always sees the
            # other; the broadcast under the mutex cannot fall between mark's
            # count check and its wait.
            if not isc_dec_if_positive(&self._in_flight):
                raise _layout.end_write_error(offset, length)
            if isc_load_flag(&self._marking) or isc_load_flag(&self._frozen):
                self._acquire()
                pthread_cond_broadcast(&self._cv)
                self._release()
            return 0
        cdef uint64_t lo = <uint64_t>offset >> self._shift
        cdef uint64_t hi = (<uint64_t>offset + <uint64_t>(length if length > 0 else 1) - 1) \
            >> self._shift
        cdef size_t i
        cdef bint found = False
        self._acquire()
        for i in range(self._nsaving):
            if self._saving[i].lo == lo and self._saving[i].hi == hi:
                found = True
                break
        if not found or not isc_dec_if_positive(&self._in_flight):
            self._release()
            raise _layout.end_write_error(offset, length)
        self._nsaving -= 1
        self._saving[i] = self._saving[self._nsaving]
        pthread_cond_broadcast(&self._cv)
        self._release()
        return 0

    cdef bint _overlaps_saving(self, uint64_t lo, uint64_t hi) noexcept nogil:
        cdef size_t i
        for i in range(self._nsaving):
            if self._saving[i].lo <= hi and lo <= self._saving[i].hi:
                return True
        return False

    cdef bint _reserve_saving(self) noexcept nogil:
        cdef size_t cap
        cdef Span *grown
        if self._nsaving < self._capsaving:
            return True
        cap = self._capsaving * 2 if self._capsaving else 16
        grown = <Span *>realloc(self._saving, cap * sizeof(Span))
        if grown == NULL:
            return False
        self._saving = grown
        self._capsaving = cap
        return True

    def record_writes(self, offsets, lengths, bint cofw=True):
        """Record a batch of host writes, in order; return their COFW chunks concatenated.

        ``offsets`` and ``lengths`` are 1-D integer arrays (or sequences) of the
        same length. The batch is atomic with respect to other calls and runs
        without the GIL. If any write lies outside the LUN, raises
        ``RangeError`` naming the first one and records nothing.
        ``cofw=False`` only sets tracking bits and flags nothing saved, marked
        or not: for ranges tracked again (what a destination missed), whose
        data no host write changes, so there is nothing to save.
        """
        offs = np.asarray(offsets)
        lens = np.asarray(lengths)
        if offs.ndim != 1 or offs.shape != lens.shape:
            raise ValueError(
                f"offsets and lengths must be 1-D arrays of the same length, "
                f"got shapes {offs.shape} and {lens.shape}"
            )
        if offs.size and (offs.dtype.kind not in "iu" or lens.dtype.kind not in "iu"):
            raise TypeError(
                f"offsets and lengths must be integer arrays, got {offs.dtype} and {lens.dtype}"
            )
        cdef const int64_t[::1] o = np.ascontiguousarray(offs, dtype=np.int64)
        cdef const int64_t[::1] n = np.ascontiguousarray(lens, dtype=np.int64)
        cdef Py_ssize_t count = o.shape[0]
        cdef Py_ssize_t i, bad = -1
        cdef uint64_t size = self._size
        cdef uint64_t lo, hi, cap = 0
        cdef int64_t *out = NULL
        cdef size_t total = 0
        cdef bint no_memory = False
        with nogil:
            for i in range(count):
                if o[i] < 0 or n[i] < 0 or <uint64_t>n[i] > size \
                        or <uint64_t>o[i] > size - <uint64_t>n[i]:
                    bad = i
                    break
        if bad >= 0:
            # Name the write as given: the int64 view wraps values past 2**63.
            raise _layout.write_range_error(int(offs[bad]), int(lens[bad]), size)
        self._acquire()
        with nogil:
            if self._marked and cofw:
                # COFW chunks are distinct unsaved transfer chunks: this bounds them.
                cap = self._bits[1 - self._t].count - self._saved.count
                out = <int64_t *>malloc(cap * 8 + 8)
                no_memory = out == NULL
            if not no_memory:
                self._writes += count
                for i in range(count):
                    if n[i]:
                        lo = <uint64_t>o[i] >> self._shift
                        hi = (<uint64_t>o[i] + <uint64_t>n[i] - 1) >> self._shift
                        total += self._record_locked(lo, hi, out + total, cofw)
            self._release()
        if no_memory:
            raise MemoryError(f"cannot allocate the COFW list for {cap} chunks")
        try:
            return _EMPTY if total == 0 else _array(out, total)
        finally:
            free(out)

    # -- marking -----------------------------------------------------------------
    def mark(self, bint full=False):
        """Freeze a point in time: the tracking bitmap becomes the transfer bitmap.

        The former transfer bitmap (empty while unmarked) becomes the tracking
        bitmap: an O(1) swap. ``full=True`` sets every transfer bit instead
        and empties tracking (a marked full copy), O(size). Waits for writes
        in flight (``begin_write``) to end and holds off new ones meanwhile.
        Raises ``StateError`` when already marked.
        """
        self._acquire()
        try:
            if self._marked:
                raise _layout.already_marked_error(self._generation)
            with nogil:
                self._drain_locked()
            if self._marked:
                raise _layout.already_marked_error(self._generation)
            if full:
                with nogil:
                    self._fill_transfer()
                    self._clear(self._t)
            else:
                self._t = 1 - self._t
            self._marked = True
            self._generation += 1
        finally:
            self._release()

    def freeze(self):
        """Wait for writes in flight to end and hold off new ``begin_write`` calls until ``thaw``.

        Lets a caller mark several delta bitmaps at one point in time (a
        consistency group: freeze them all, mark them all, thaw them all) or
        snapshot one between writes. ``mark`` and the other methods still
        work while frozen. Freezing is exclusive: a second ``freeze`` waits
        for the first one's ``thaw``.
        """
        self._acquire()
        with nogil:
            while self._marking or self._frozen:
                pthread_cond_wait(&self._cv, &self._mu)
            isc_store_flag(&self._frozen, 1)
            while isc_load(&self._in_flight):
                pthread_cond_wait(&self._cv, &self._mu)
            self._release()

    def thaw(self):
        """Let the writes held off by ``freeze`` go on. No-op when not frozen.

        Returns once each write it woke has had the mutex (and recorded, unless
        it waits again for a save in flight): the thread that froze (a
        checkpoint, whose encoding takes the mutex hold after hold) would
        otherwise take the mutex back before a woken write runs, and keep the
        write waiting for the whole encoding. Then yields the CPU once, the GIL
        released: a writer the thaw woke needs the GIL to go on, and the thread
        that froze would otherwise take it straight back and keep it for the
        whole switch interval, releases in between restarting the writer's wait.
        """
        cdef uint64_t waiting, woken
        self._acquire()
        waiting = self._waiting if self._frozen else 0
        woken = self._woken
        isc_store_flag(&self._frozen, 0)
        pthread_cond_broadcast(&self._cv)
        if waiting:
            self._thawing += 1
            with nogil:
                while self._woken - woken < waiting:
                    pthread_cond_wait(&self._cv, &self._mu)
            self._thawing -= 1
        self._release()
        with nogil:
            sched_yield()

    cdef void _drain_locked(self) noexcept nogil:
        """Wait until no ``begin_write`` write is in flight; the caller holds the mutex.

        New writes wait while the flag is up and, once it drops, for the
        mutex the caller keeps until its own change is done.
        """
        while self._marking:
            pthread_cond_wait(&self._cv, &self._mu)
        isc_store_flag(&self._marking, 1)
        while isc_load(&self._in_flight):
            pthread_cond_wait(&self._cv, &self._mu)
        isc_store_flag(&self._marking, 0)
        pthread_cond_broadcast(&self._cv)

    cdef void _fill_transfer(self) noexcept nogil:
        cdef Bits *xfer = &self._bits[1 - self._t]
        cdef uint64_t tail = self._chunks & 63
        self._changing_range(1 - self._t, 0, self._nwords - 1)
        memset(xfer.words, 0xFF, self._nwords * 8)
        if tail:
            xfer.words[self._nwords - 1] = ONES >> (64 - tail)
        xfer.count = self._chunks
        _touch(xfer.summary, 0, self._nwords - 1)

    cdef void _clear(self, uint64_t a) noexcept nogil:
        """Zero every summary-dirty block of physical array ``a``.

        Runs of pages whose blocks are all dirty go back to the kernel
        (``madvise(MADV_DONTNEED)``: they read as zero, and cost nothing
        until written again) instead of being written with zeros.
        """
        cdef Bits *bits = self._array(a)
        cdef uint64_t si, sw, k, dirty, page, block, w0
        cdef uint64_t run = 0        # pages in the run that ends before `start + run`
        cdef uint64_t start = 0
        cdef uint64_t whole = self._nwords >> PAGE_SHIFT  # pages of 512 words
        for si in range(self._nsum):
            sw = bits.summary[si]
            if sw == 0:
                continue
            for k in range(8):
                dirty = sw >> (k << 3) & 0xFF
                if dirty == 0:
                    continue
                page = (si << 3) + k
                self._changing(a, page << PAGE_SHIFT)
                if dirty == 0xFF and page < whole:
                    if run and start + run == page:
                        run += 1
                        continue
                    self._zero_run(bits, start, run)
                    start, run = page, 1
                    continue
                while dirty:
                    block = (page << 3) + ctz(dirty)
                    dirty &= dirty - 1
                    w0 = _first_word(block)
                    memset(bits.words + w0, 0, (min(w0 + 64, self._nwords) - w0) * 8)
            bits.summary[si] = 0
        self._zero_run(bits, start, run)
        bits.count = 0

    cdef void _zero_run(self, Bits *bits, uint64_t start, uint64_t run) noexcept nogil:
        """Zero pages ``[start, start + run)`` of ``bits``: given back to the kernel when long."""
        cdef char *at = <char *>(bits.words + (start << PAGE_SHIFT))
        cdef size_t length = run << (PAGE_SHIFT + 3)
        if length >= ZERO_BY_MADVISE and madvise(at, length, MADV_DONTNEED) == 0:
            return
        memset(at, 0, length)

    def unmark(self):
        """Leave the marked state: merge transfer into tracking, drop saved flags.

        Whatever was not sent is sent next time (the transfer bitmap is
        OR-merged into the tracking bitmap, then emptied). No-op when unmarked.
        Costs O(dirty blocks of tracking and saved), not O(size): the tracking
        bits are merged into the transfer words and the roles swap. A full
        bitmap is the union already: a full transfer bitmap takes no merge
        (the roles swap), a full tracking bitmap keeps its role and the
        transfer bitmap is emptied. Emptied bitmaps give whole pages back.
        """
        cdef Bits *track = &self._bits[self._t]
        cdef Bits *xfer = &self._bits[1 - self._t]
        self._acquire()
        if self._marked:
            with nogil:
                if track.count == self._chunks:
                    self._clear(1 - self._t)
                else:
                    if track.count and xfer.count < self._chunks:
                        self._merge_tracking_into_transfer()
                    if track.count:
                        self._clear(self._t)
                    self._t = 1 - self._t
                if self._saved.count:
                    self._clear(2)
                self._marked = False
        self._release()

    cdef void _merge_tracking_into_transfer(self) noexcept nogil:
        """OR tracking into transfer; tracking is left as it is (``_clear`` empties it)."""
        cdef Bits *track = &self._bits[self._t]
        cdef Bits *xfer = &self._bits[1 - self._t]
        cdef uint64_t si, sw, k, block, w0
        for si in range(self._nsum):
            sw = track.summary[si]
            if sw == 0:
                continue
            xfer.summary[si] |= sw
            for k in range(8):
                if sw >> (k << 3) & 0xFF:
                    self._changing(1 - self._t, ((si << 3) + k) << PAGE_SHIFT)
            if sw == ONES:  # 64 dirty blocks in a row: one span
                self._merge_span(track, xfer, si << 12, min((si + 1) << 12, self._nwords))
                continue
            while sw:
                block = (si << 6) + ctz(sw)
                sw &= sw - 1
                w0 = _first_word(block)
                self._merge_span(track, xfer, w0, min(w0 + 64, self._nwords))

    cdef inline void _merge_span(self, Bits *track, Bits *xfer, uint64_t w0,
                                 uint64_t w1) noexcept nogil:
        """OR tracking words w0..w1 - 1 into transfer's."""
        cdef uint64_t w, v, x, end, full, more = 0
        # Full transfer words hold the union already, whatever tracking holds:
        # skip them a block at a time (a branch-free AND over its 64 words),
        # so a nearly full transfer bitmap is read alone, not with tracking.
        while w0 < w1:
            end = min(w0 + 64, w1)
            full = ONES
            for w in range(w0, end):
                full &= xfer.words[w]
            if full != ONES:
                break
            w0 = end
        # A branch-free pass next: a span whose transfer words hold every
        # tracking bit already (as after a full mark) is only read.
        for w in range(w0, w1):
            more |= track.words[w] & ~xfer.words[w]
        if more == 0:
            return
        for w in range(w0, w1):
            v = track.words[w]
            x = xfer.words[w]
            xfer.count += popcount(v & ~x)
            xfer.words[w] = x | v

    def clear_tracking(self):
        """Empty the tracking bitmap (an unmarked full copy starts from here).

        Like ``mark``, waits for writes in flight to end and holds off new
        ones, so a write is either cleared with the rest (its data landed
        before the copy reads) or recorded after.
        """
        self._acquire()
        with nogil:
            self._drain_locked()
            self._clear(self._t)
            self._release()

    # -- the copy side -------------------------------------------------------------
    cdef inline uint64_t _chunk(self, int64_t chunk) except? 0:
        if chunk < 0 or <uint64_t>chunk >= self._chunks:
            raise _layout.chunk_error(chunk, self._chunks)
        return <uint64_t>chunk

    def test_and_clear(self, chunk):
        """Clear one transfer bit and its saved flag; return the transfer bit's old value.

        Raises ``RangeError`` for a chunk outside ``[0, chunks)``.
        """
        cdef int64_t c_chunk = _i64(chunk)
        cdef uint64_t c = self._chunk(c_chunk)
        cdef uint64_t w = c >> 6
        cdef uint64_t bit = (<uint64_t>1) << (c & 63)
        cdef Bits *xfer
        cdef bint was_set
        self._acquire()
        xfer = &self._bits[1 - self._t]
        was_set = xfer.words[w] & bit != 0
        if was_set:
            self._changing(1 - self._t, w)
            xfer.words[w] &= ~bit
            xfer.count -= 1
            if self._saved.count and self._saved.words[w] & bit:
                self._changing(2, w)
                self._saved.words[w] &= ~bit
                self._saved.count -= 1
        self._release()
        return was_set

    cdef int _check_chunk_range(self, int64_t first, int64_t count) except -1:
        if first < 0 or count < 0 or <uint64_t>count > self._chunks \
                or <uint64_t>first > self._chunks - <uint64_t>count:
            raise _layout.chunk_range_error(first, count, self._chunks)
        return 0

    def clear_transfer(self, first, count, generation=-1):
        """Clear the transfer bits and saved flags of chunks ``[first, first + count)``.

        Returns how many of those transfer bits were set. The copy job calls
        this once a run of chunks is confirmed on every destination. With
        ``generation >= 0`` it clears only while the map is still marked at
        that generation, else raises ``StateError``: the caller's mark ended
        (e.g. an abort unmarked it), so what it sent may not be the
        point-in-time data. Raises ``RangeError`` for a range outside the map.
        Both errors change nothing.
        """
        cdef int64_t c_first = _i64(first)
        cdef int64_t c_count = _i64(count)
        cdef int64_t c_generation = _i64(generation)
        self._check_chunk_range(c_first, c_count)
        cdef uint64_t lo = c_first
        cdef uint64_t hi = c_first + c_count - 1
        cdef uint64_t wlo = lo >> 6
        cdef uint64_t whi = hi >> 6
        cdef uint64_t w, m, c
        cdef uint64_t cleared = 0
        cdef Bits *xfer
        self._acquire()
        if c_generation >= 0 and (not self._marked or self._generation != <uint64_t>c_generation):
            self._release()
            raise _layout.mark_ended_error(c_generation, self._generation, self._marked)
        if c_count:
            xfer = &self._bits[1 - self._t]
            for w in range(wlo, whi + 1):
                m = _mask(w, wlo, whi, lo, hi)
                c = xfer.words[w] & m
                if c:
                    cleared += popcount(c)
                    self._changing(1 - self._t, w)
                    xfer.words[w] &= ~m
                    c = self._saved.words[w] & m
                    if c:
                        self._saved.count -= popcount(c)
                        self._changing(2, w)
                        self._saved.words[w] &= ~m
            xfer.count -= cleared
        self._release()
        return cleared

    def saved_in(self, first, count):
        """The saved (COFW) chunks in ``[first, first + count)``, ascending, as int64.

        Raises ``RangeError`` for a range outside the map.
        """
        cdef int64_t c_first = _i64(first)
        cdef int64_t c_count = _i64(count)
        self._check_chunk_range(c_first, c_count)
        cdef uint64_t lo = c_first
        cdef uint64_t hi = c_first + c_count - 1
        cdef uint64_t wlo = lo >> 6
        cdef uint64_t whi = hi >> 6
        cdef uint64_t w
        cdef int64_t stack[STACK_CHUNKS]
        cdef int64_t *out = stack
        cdef size_t n = 0
        if c_count == 0:
            return _EMPTY
        if c_count > STACK_CHUNKS:
            out = <int64_t *>malloc(c_count * 8)
            if out == NULL:
                raise MemoryError(f"cannot allocate a list of {c_count} chunks")
        self._acquire()
        if self._saved.count:
            for w in range(wlo, whi + 1):
                n += _emit(out + n, w, self._saved.words[w] & _mask(w, wlo, whi, lo, hi))
        self._release()
        try:
            return _EMPTY if n == 0 else _array(out, n)
        finally:
            if out != stack:
                free(out)

    def extents(self, max_chunks=0):
        """Runs of adjacent set transfer bits, as an int64 array of (first_chunk, count) rows.

        Ascending; when ``max_chunks > 0`` no run is longer than it (longer
        runs are split). Clears nothing. Visits only summary-dirty blocks.
        Raises ``ParameterError`` for a negative ``max_chunks``.
        """
        cdef int64_t c_max_chunks = _i64(max_chunks)
        if c_max_chunks < 0:
            raise _layout.max_chunks_error(c_max_chunks)
        cdef Runs runs
        runs.data = NULL
        runs.n = 0
        runs.cap = 0
        runs.limit = <uint64_t>c_max_chunks
        runs.failed = False
        runs.start = 0
        runs.length = 0
        self._acquire()
        with nogil:
            # Runs never outnumber set bits: start with room for most maps.
            runs.cap = min(self._bits[1 - self._t].count, 1 << 20)
            runs.data = <int64_t *>malloc(runs.cap * 16 + 16)
            runs.failed = runs.data == NULL
            if not runs.failed:
                self._scan_transfer(&runs)
            self._release()
            _runs_flush(&runs)
        try:
            if runs.failed:
                raise MemoryError("cannot allocate the extent list")
            if runs.n == 0:
                return np.empty((0, 2), dtype=np.int64)
            return _array(runs.data, 2 * runs.n).reshape(-1, 2)
        finally:
            free(runs.data)

    cdef void _scan_transfer(self, Runs *runs) noexcept nogil:
        cdef Bits *xfer = &self._bits[1 - self._t]
        cdef uint64_t si, sw, bit, block, w0, w, n, i, nz, v, x, t, length, start
        for si in range(self._nsum):
            sw = xfer.summary[si]
            while sw:
                bit = ctz(sw)
                sw &= sw - 1
                block = (si << 6) + bit
                w0 = _first_word(block)
                n = min(64, self._nwords - w0)
                # A branch-free pass marks the block's non-zero words, so sparse
                # blocks cost no misprediction per empty word.
                nz = 0
                for i in range(n):
                    nz |= (<uint64_t>(xfer.words[w0 + i] != 0)) << i
                if nz == 0:
                    # Tidy the summary: a scan that found the block empty may say so.
                    xfer.summary[si] &= ~((<uint64_t>1) << bit)
                while nz:
                    w = w0 + ctz(nz)
                    nz &= nz - 1
                    v = xfer.words[w]
                    while v:
                        # Bits below t are already consumed; the run is as long
                        # as the ones starting at t.
                        t = ctz(v)
                        x = v >> t
                        length = 64 - t if x == ONES >> t else ctz(~x)
                        start = (w << 6) + t
                        if runs.length and runs.start + runs.length == start:
                            runs.length += length
                        else:
                            _runs_flush(runs)
                            runs.start = start
                            runs.length = length
                        v = 0 if t + length >= 64 else v & (ONES << (t + length))

    # -- queries -----------------------------------------------------------------
    cdef inline bint _bit(self, Bits *bits, uint64_t c) noexcept:
        return bits.words[c >> 6] >> (c & 63) & 1

    def tracking(self, chunk):
        """The tracking bit of ``chunk`` (``RangeError`` outside the map)."""
        cdef int64_t c_chunk = _i64(chunk)
        cdef uint64_t c = self._chunk(c_chunk)
        self._acquire()
        value = self._bit(&self._bits[self._t], c)
        self._release()
        return value

    def transfer(self, chunk):
        """The transfer bit of ``chunk`` (``RangeError`` outside the map)."""
        cdef int64_t c_chunk = _i64(chunk)
        cdef uint64_t c = self._chunk(c_chunk)
        self._acquire()
        value = self._bit(&self._bits[1 - self._t], c)
        self._release()
        return value

    def is_saved(self, chunk):
        """Whether ``chunk`` was saved (COFW) in this mark (``RangeError`` outside the map)."""
        cdef int64_t c_chunk = _i64(chunk)
        cdef uint64_t c = self._chunk(c_chunk)
        self._acquire()
        value = self._bit(&self._saved, c)
        self._release()
        return value

    # -- persistence -------------------------------------------------------------
    def to_bytes(self):
        """The whole state as versioned, checksummed bytes (see ``isc._layout``)."""
        cdef size_t nbytes = self._nwords * 8
        parts = [bytearray(nbytes) for _ in range(3)]
        cdef unsigned char *track = parts[0]
        cdef unsigned char *xfer = parts[1]
        cdef unsigned char *saved = parts[2]
        self._acquire()
        with nogil:
            memcpy(track, self._bits[self._t].words, nbytes)
            memcpy(xfer, self._bits[1 - self._t].words, nbytes)
            memcpy(saved, self._saved.words, nbytes)
        state = _layout.State(
            self._size, self._granularity, self._generation, self._marked, *parts
        )
        self._release()
        return _layout.pack(state)

    @classmethod
    def from_bytes(cls, data):
        """Rebuild a delta bitmap from ``to_bytes`` output.

        Raises ``CorruptMetadata`` (a ValueError) for truncated, corrupt,
        foreign or unknown-version data, ``TypeError`` for non-bytes.
        """
        state = _layout.unpack(data)
        cdef DeltaBitmap bitmap = cls(state.size, state.granularity)
        bitmap._load(&bitmap._bits[0], state.tracking)
        bitmap._load(&bitmap._bits[1], state.transfer)
        bitmap._load(&bitmap._saved, state.saved)
        bitmap._t = 0
        bitmap._marked = state.marked
        bitmap._generation = state.generation
        return bitmap

    cdef void _load(self, Bits *bits, const unsigned char[::1] data):
        cdef uint64_t w
        memcpy(bits.words, &data[0], self._nwords * 8)
        with nogil:
            bits.count = 0
            for w in range(self._nwords):
                if bits.words[w]:
                    bits.count += popcount(bits.words[w])
                    _touch(bits.summary, w, w)

    @property
    def dirty_pages(self):
        """Pages changed since the last snapshot (what the next one encodes, unless a base)."""
        return self._ndirty

    def snapshot(self, bint everything=False):
        """Open a snapshot of the state as it is now: O(1), host writes go on meanwhile.

        Returns ``(base, t, marked, generation)``. ``t`` is the physical array
        (0 or 1) that holds tracking; ``base`` says the records describe every
        page that may hold a set bit, to replay onto an empty map (asked with
        ``everything``, and forced for a new map and after an abandoned
        snapshot); otherwise they are the pages changed since the last
        snapshot, to replay onto its state. Take the records with
        ``snapshot_records``, then close with ``snapshot_end``. Raises
        ``StateError`` while a snapshot is open.
        """
        cdef uint64_t *swap
        self._acquire()
        try:
            if self._snapping:
                raise _layout.snapshot_open_error()
            base = everything or self._everything
            with nogil:
                if base:
                    # Every page: the records leave the empty ones out as they go.
                    self._pend_all()
                    memset(self._dirty, 0, 3 * self._nmap * 8)
                    self._npending = 3 * self._npages
                else:
                    # The map of pending pages is empty between snapshots.
                    swap = self._pending
                    self._pending = self._dirty
                    self._dirty = swap
                    self._npending = self._ndirty
                self._ndirty = 0
            self._snapping = True
            self._base_snapshot = base
            self._everything = False
            self._cursor = 0
            self._ncow = 0
            self._cow_taken = 0
            self._cow_failed = False
            return (base, self._t, self._marked, self._generation)
        finally:
            self._release()

    cdef void _pend_all(self) noexcept nogil:
        """Set in ``_pending`` every page of the three arrays: O(pages / 64)."""
        cdef uint64_t a
        memset(self._pending, 0xFF, 3 * self._nmap * 8)
        if self._npages & 63:
            for a in range(3):
                self._pending[(a + 1) * self._nmap - 1] = ONES >> (64 - (self._npages & 63))

    def snapshot_records(self, out):
        """Encode records of the open snapshot into ``out``; return the bytes written (0: all done).

        ``out`` is a writable buffer of at least ``MAX_RECORD`` bytes (``isc._layout``).
        Each record holds its page as it was at ``snapshot`` (pages changed
        since were copied first). Holds the mutex for a few pages at a time;
        between two holds a thread blocked on it gets it first, and a thread
        waiting for this CPU runs (see "Persistence" above).
        Raises ``StateError`` with no snapshot open, ``ParameterError`` for a
        small buffer, ``MemoryError`` when a copy of a changed page could not
        be kept (end the snapshot with ``snapshot_end(False)``).
        """
        cdef unsigned char[::1] view = out
        cdef size_t cap = view.shape[0]
        cdef size_t n = 0
        cdef size_t size
        cdef unsigned char *dst
        cdef uint64_t q, a, i, bit, held, visited, served
        cdef uint64_t since = _now_ns()
        cdef uint64_t per_array = self._nmap << 6
        if cap < MAX_RECORD:
            raise _layout.ParameterError(
                f"a buffer for page records needs at least {MAX_RECORD} bytes, got {cap}"
            )
        dst = &view[0]
        self._acquire()
        if not self._snapping:
            self._release()
            raise _layout.snapshot_closed_error()
        with nogil:
            while not self._cow_failed:
                # Pages copied before a change first, then the others in order.
                while self._cow_taken < self._ncow and n + MAX_RECORD <= cap:
                    size = _record_size(self._cow + self._cow_taken)
                    memcpy(dst + n, self._cow + self._cow_taken, size)
                    n += size
                    self._cow_taken += size
                if self._cow_taken == self._ncow:
                    self._ncow = 0
                    self._cow_taken = 0
                held = visited = 0
                while self._npending and n + MAX_RECORD <= cap and held < PAGES_PER_HOLD \
                        and visited < EMPTY_PER_HOLD:
                    q = self._next_pending()
                    i = q >> 6
                    bit = (<uint64_t>1) << (q & 63)
                    self._pending[i] &= ~bit
                    self._npending -= 1
                    a = q // per_array
                    size = self._encode(a, q - a * per_array, dst + n)
                    n += size
                    held += size != 0
                    visited += 1
                if n + MAX_RECORD > cap or (not self._npending and not self._ncow):
                    break
                if self._hooked:
                    self._run_hold_hook()
                # Let host writes in between: a thread blocked on the mutex takes it
                # first (unlocking and locking again would win it back before the
                # woken thread runs), and a thread that waits for this CPU (a writer
                # this one's wake-up preempted) runs before the next hold.
                if isc_load(&self._blocked):
                    served = self._served
                    self._handing += 1
                    while self._served == served:
                        pthread_cond_wait(&self._cv, &self._mu)
                    self._handing -= 1
                self._release()
                _yield_due(&since)
                pthread_mutex_lock(&self._mu)
            self._release()
        if self._cow_failed:
            raise MemoryError("cannot keep a copy of a page the open snapshot needs")
        return n

    cdef void _run_hold_hook(self) noexcept with gil:
        self._hold_hook()

    def _on_hold_end(self, hook):
        """For tests: call ``hook()`` (or nothing, with None) at the end of each hold of
        ``snapshot_records`` that more follow, the mutex held: it must not call this
        map, and what it raises is reported as unraisable."""
        self._hold_hook = hook
        self._hooked = hook is not None

    cdef uint64_t _next_pending(self) noexcept nogil:
        """The first pending page at or after the cursor; some page is pending."""
        cdef uint64_t i = self._cursor >> 6
        cdef uint64_t w = self._pending[i] & (ONES << (self._cursor & 63))
        while w == 0:
            i += 1
            w = self._pending[i]
        self._cursor = (i << 6) + ctz(w)
        return self._cursor

    def snapshot_end(self, bint committed):
        """Close the open snapshot.

        ``committed``: every record was taken and is persisted; the pages
        changed since the snapshot are the next snapshot's. Otherwise the
        snapshot is abandoned and the next one is a base. Raises
        ``StateError`` with no snapshot open, or when committing a snapshot
        whose records were not all taken (nothing changes then).
        """
        self._acquire()
        try:
            if not self._snapping:
                raise _layout.snapshot_closed_error()
            if committed and (self._npending or self._ncow or self._cow_failed):
                raise _layout.snapshot_unfinished_error()
            if not committed:
                memset(self._pending, 0, 3 * self._nmap * 8)
                self._npending = 0
                self._everything = True
            self._snapping = False
            free(self._cow)
            self._cow = NULL
            self._capcow = 0
            self._ncow = 0
            self._cow_taken = 0
        finally:
            self._release()

    def apply_records(self, data, offset=0):
        """Load page records (``isc._layout`` format) into this map; return the bytes used.

        Each record replaces its page's words. Stops before a record that
        ``data`` holds only part of, so a stream can be fed in pieces. For
        loading a map from its checkpoints: end with ``load_state``. Raises
        ``CorruptMetadata`` naming the record that fails its checksum or does
        not fit the map, by its page and its byte offset (``offset`` is that
        of ``data[0]``, in a file say); the records before it are applied.
        """
        cdef int64_t c_offset = _i64(offset)
        cdef const unsigned char[::1] view = data
        cdef size_t n = view.shape[0]
        cdef size_t at = 0
        cdef size_t size
        cdef int problem = 0
        cdef const unsigned char *src
        cdef uint64_t ident = 0
        if n == 0:
            return 0
        src = &view[0]
        self._acquire()
        with nogil:
            while at + RECORD_HEAD <= n:
                if _record_kind(src + at) == SPARSE_PAGE and at + RECORD_HEAD + RECORD_MASKS > n:
                    break
                size = _record_size(src + at)
                if size == 0:
                    problem = 1
                    memcpy(&ident, src + at + 8, 8)
                    break
                if at + size > n:
                    break
                problem = self._apply(src + at, size, &ident)
                if problem:
                    break
                at += size
            self._everything = True
            self._release()
        if problem:
            raise _layout.record_error(c_offset + at, ident, self._npages, problem)
        return at

    cdef int _apply(self, const unsigned char *rec, size_t size, uint64_t *ident) noexcept nogil:
        """Replace one page by a record; 0, or why the record is refused (see ``_layout``)."""
        cdef uint32_t crc, kind
        cdef uint64_t a, p, n, i, j, m, v, k = 0
        cdef uint64_t masks[8]
        cdef uint64_t *words
        cdef Bits *bits
        cdef uint64_t tail = self._chunks & 63
        memcpy(&crc, rec, 4)
        memcpy(&kind, rec + 4, 4)
        memcpy(ident, rec + 8, 8)
        if isc_crc32(rec + 4, size - 4) != crc:
            return 1
        if ident[0] >= 3 * self._npages:
            return 2
        a = ident[0] // self._npages
        p = ident[0] - a * self._npages
        bits = self._array(a)
        words = bits.words + (p << PAGE_SHIFT)
        n = min(<uint64_t>PAGE_WORDS, self._nwords - (p << PAGE_SHIFT))
        if kind == SPARSE_PAGE:
            memcpy(masks, rec + RECORD_HEAD, RECORD_MASKS)
            for j in range((n + 63) >> 6, 8):
                if masks[j]:
                    return 3
            if n & 63 and masks[n >> 6] >> (n & 63):
                return 3
        for i in range(n):
            bits.count -= popcount(words[i])
        if kind == ZERO_PAGE:
            memset(words, 0, n * 8)
        elif kind == FULL_PAGE:
            memset(words, 0xFF, n * 8)
            if tail and (p << PAGE_SHIFT) + n == self._nwords:
                words[n - 1] = ONES >> (64 - tail)
        else:
            memset(words, 0, n * 8)
            for j in range(8):
                m = masks[j]
                while m:
                    memcpy(&v, rec + RECORD_HEAD + RECORD_MASKS + 8 * k, 8)
                    words[(j << 6) + ctz(m)] = v
                    k += 1
                    m &= m - 1
        for i in range(n):
            bits.count += popcount(words[i])
        if tail and (p << PAGE_SHIFT) + n == self._nwords and words[n - 1] >> tail:
            return 3
        _touch(bits.summary, p << PAGE_SHIFT, (p << PAGE_SHIFT) + n - 1)
        return 0

    def load_state(self, int t, bint marked, generation):
        """End a load by ``apply_records``: set the roles and the mark as a snapshot reported them.

        ``t`` is the physical array holding tracking (0 or 1). The map then
        matches what was persisted: the next snapshot holds only what changes
        from here. Raises ``CorruptMetadata`` when the loaded bits are
        impossible (transfer or saved bits while unmarked, a saved chunk
        without its transfer bit), ``ParameterError`` for a bad ``t`` or a
        negative generation, ``StateError`` while a snapshot is open; nothing
        changes then.
        """
        cdef int64_t c_generation = _i64(generation)
        cdef Bits *xfer
        cdef Bits *saved = &self._saved
        cdef uint64_t si, sw, w, w0, w1
        if t not in (0, 1) or c_generation < 0:
            raise _layout.ParameterError(
                f"a loaded state needs t in (0, 1) and a generation >= 0, got {t} and {generation}"
            )
        self._acquire()
        try:
            if self._snapping:
                raise _layout.snapshot_open_error()
            xfer = &self._bits[1 - t]
            if not marked and (xfer.count or saved.count):
                raise _layout.CorruptMetadata(
                    "the loaded state is unmarked but has transfer or saved bits set"
                )
            for si in range(self._nsum):
                sw = saved.summary[si]
                while sw:
                    w0 = _first_word((si << 6) + ctz(sw))
                    sw &= sw - 1
                    w1 = min(w0 + 64, self._nwords)
                    for w in range(w0, w1):
                        if saved.words[w] & ~xfer.words[w]:
                            raise _layout.CorruptMetadata(
                                f"the loaded state has saved chunks without their transfer "
                                f"bit (word {w})"
                            )
            self._t = t
            self._marked = marked
            self._generation = c_generation
            self._everything = False
        finally:
            self._release()

    def _check(self):
        """Verify every invariant of the representation; raise AssertionError if one fails."""
        self._acquire()
        try:
            self._check_bits("tracking", &self._bits[self._t])
            self._check_bits("transfer", &self._bits[1 - self._t])
            self._check_bits("saved", &self._saved)
            xfer = &self._bits[1 - self._t]
            for w in range(self._nwords):
                if self._saved.words[w] & ~xfer.words[w]:
                    raise AssertionError(f"saved chunk without transfer bit in word {w}")
            if not self._marked and (xfer.count or self._saved.count):
                raise AssertionError("transfer or saved bits set while unmarked")
            if self._nsaving > isc_load(&self._in_flight):
                raise AssertionError("more COFW writes in flight than writes in flight")
        finally:
            self._release()

    cdef int _check_bits(self, str name, Bits *bits) except -1:
        cdef uint64_t w, total = 0
        cdef uint64_t tail = self._chunks & 63
        for w in range(self._nwords):
            if bits.words[w]:
                total += popcount(bits.words[w])
                if not bits.summary[w >> 12] >> ((w >> BLOCK_SHIFT) & 63) & 1:
                    raise AssertionError(f"{name} word {w} has bits but its summary is clean")
        if total != bits.count:
            raise AssertionError(f"{name} count is {bits.count} but {total} bits are set")
        if tail and bits.words[self._nwords - 1] >> tail:
            raise AssertionError(f"{name} has bits set past the last chunk")
        return 0

    # -- the Python protocols ---------------------------------------------------
    def __len__(self):
        """Number of chunks (as ``chunks``), so ``len(bitmap)`` sizes a chunk index."""
        return self._chunks

    def __eq__(self, other):
        """Equal geometry, mark, generation and bits; ``writes`` (not persisted) is not compared.

        O(summary + dirty blocks of either map). Bitmaps are mutable, hence unhashable.
        """
        if not isinstance(other, DeltaBitmap):
            return NotImplemented
        if other is self:
            return True
        cdef DeltaBitmap that = other
        cdef DeltaBitmap first = self
        cdef DeltaBitmap second = that
        cdef bint same
        if self._size != that._size or self._granularity != that._granularity:
            return False
        if <size_t><void *>that < <size_t><void *>self:
            # One lock order for every pair: a == b and b == a in two threads
            # cannot each hold the lock the other waits for.
            first, second = that, self
        first._acquire()
        second._acquire()
        with nogil:
            same = (
                self._marked == that._marked and self._generation == that._generation
                and _same_bits(&self._bits[self._t], &that._bits[that._t], self._nsum,
                               self._nwords)
                and _same_bits(&self._bits[1 - self._t], &that._bits[1 - that._t],
                               self._nsum, self._nwords)
                and _same_bits(&self._saved, &that._saved, self._nsum, self._nwords)
            )
            second._release()
            first._release()
        return same

    __hash__ = None

    def __reduce__(self):
        """Pickles as ``to_bytes`` (so ``writes`` restarts at 0, as after ``from_bytes``)."""
        return (type(self).from_bytes, (self.to_bytes(),))

    def chunks_of(self, which):
        """The set chunks of one bitmap, ascending, as an int64 array.

        ``which`` is ``"tracking"``, ``"transfer"`` or ``"saved"``. Like
        pyroaring's ``to_array()`` and bitarray's ``search(1)``: the array
        holds 8 bytes per set chunk (``extents`` gives the transfer bitmap
        as runs, far smaller when they are long). O(summary + dirty blocks).
        Raises ``ParameterError`` for another name.
        """
        cdef uint64_t a
        cdef cnp.npy_intp n
        cdef Bits *bits
        cdef int64_t *out
        if which not in _BITMAPS:
            raise _layout.ParameterError(
                f"chunks_of takes 'tracking', 'transfer' or 'saved', got {which!r}"
            )
        self._acquire()
        try:
            a = _BITMAPS.index(which)
            bits = self._array(2 if a == 2 else self._t ^ a)
            n = <cnp.npy_intp>bits.count
            chunks = cnp.PyArray_SimpleNew(1, &n, cnp.NPY_INT64)
            out = <int64_t *>cnp.PyArray_DATA(chunks)
            with nogil:
                _collect(bits, self._nsum, self._nwords, out)
        finally:
            self._release()
        return chunks

    def __repr__(self):
        return (
            f"DeltaBitmap(size={self._size}, granularity={self._granularity}, "
            f"{'marked' if self._marked else 'unmarked'}, generation={self._generation}, "
            f"tracking={self.tracking_count}, transfer={self.transfer_count}, "
            f"saved={self.saved_count})"
        )


_BITMAPS = ("tracking", "transfer", "saved")
"""The names ``chunks_of`` takes, in the order of their physical arrays relative to ``_t``."""


# -- helpers ------------------------------------------------------------------

cdef inline uint32_t _record_kind(const unsigned char *rec) noexcept nogil:
    cdef uint32_t kind
    memcpy(&kind, rec + 4, 4)
    return kind


cdef inline size_t _record_size(const unsigned char *rec) noexcept nogil:
    """Size of the record at ``rec`` from its head (and masks); 0 for an unknown kind."""
    cdef uint32_t kind = _record_kind(rec)
    cdef uint64_t masks[8]
    cdef size_t words = 0
    cdef int j
    if kind == ZERO_PAGE or kind == FULL_PAGE:
        return RECORD_HEAD
    if kind != SPARSE_PAGE:
        return 0
    memcpy(masks, rec + RECORD_HEAD, RECORD_MASKS)
    for j in range(8):
        words += popcount(masks[j])
    return RECORD_HEAD + RECORD_MASKS + 8 * words


cdef bint _same_bits(Bits *a, Bits *b, uint64_t nsum, uint64_t nwords) noexcept nogil:
    """Whether two bitmaps of one geometry hold the same bits: blocks clean in both are zero."""
    cdef uint64_t si, sw, w0
    if a.count != b.count:
        return False
    for si in range(nsum):
        sw = a.summary[si] | b.summary[si]
        while sw:
            w0 = _first_word((si << 6) + ctz(sw))
            sw &= sw - 1
            if memcmp(a.words + w0, b.words + w0, (min(w0 + 64, nwords) - w0) * 8):
                return False
    return True


cdef void _collect(Bits *bits, uint64_t nsum, uint64_t nwords, int64_t *out) noexcept nogil:
    """Write the set chunks of ``bits`` to ``out`` (room for ``bits.count``), ascending."""
    cdef uint64_t si, sw, w0, w
    cdef size_t n = 0
    for si in range(nsum):
        sw = bits.summary[si]
        while sw:
            w0 = _first_word((si << 6) + ctz(sw))
            sw &= sw - 1
            for w in range(w0, min(w0 + 64, nwords)):
                n += _emit(out + n, w, bits.words[w])


cdef inline void _runs_flush(Runs *runs) noexcept nogil:
    """Append the pending run, split into pieces of at most ``limit`` chunks."""
    cdef uint64_t piece
    cdef int64_t *grown
    while runs.length and not runs.failed:
        if runs.n == runs.cap:
            runs.cap = runs.cap * 2 if runs.cap else 1024
            grown = <int64_t *>realloc(runs.data, runs.cap * 16)
            if grown == NULL:
                runs.failed = True
                return
            runs.data = grown
        piece = runs.length if runs.limit == 0 or runs.length < runs.limit else runs.limit
        runs.data[2 * runs.n] = <int64_t>runs.start
        runs.data[2 * runs.n + 1] = <int64_t>piece
        runs.n += 1
        runs.start += piece
        runs.length -= piece


cdef struct Kept:
    int64_t region              # a region kept hot (DeltaBitmap.keep_hot)
    double when                 # when it was last found written


cdef int _newest_first(const void *a, const void *b) noexcept nogil:
    """Order of ``Kept``: the latest ``when`` first, then by region (a stable sort of
    regions given ascending)."""
    cdef const Kept *x = <const Kept *>a
    cdef const Kept *y = <const Kept *>b
    if x.when != y.when:
        return -1 if x.when > y.when else 1
    return (x.region > y.region) - (x.region < y.region)


cdef int _by_region(const void *a, const void *b) noexcept nogil:
    cdef const Kept *x = <const Kept *>a
    cdef const Kept *y = <const Kept *>b
    return (x.region > y.region) - (x.region < y.region)


cdef void _unzip(const Kept *kept, size_t n, int64_t[::1] regions,
                 double[::1] when) noexcept:
    cdef size_t i
    with nogil:
        for i in range(n):
            regions[i] = kept[i].region
            when[i] = kept[i].when


cdef object _array(const int64_t *data, size_t n):
    """A new int64 ndarray holding a copy of ``data[0:n]``."""
    cdef cnp.npy_intp dims = <cnp.npy_intp>n
    arr = cnp.PyArray_SimpleNew(1, &dims, cnp.NPY_INT64)
    memcpy(cnp.PyArray_DATA(arr), data, n * 8)
    return arr


cdef struct FreeList:
    uint64_t size               # bytes of each slot on the list
    size_t n                    # offsets held
    size_t cap
    uint64_t *offsets


cdef class Slots:
    """The slots of a save area of at most ``capacity`` bytes: its allocator.

    ``take(length)`` returns ``(offset, slot, length)``: ``length`` bytes in a
    slot of ``slot >= length`` bytes at ``offset``. It takes the last freed
    slot of exactly ``length`` bytes, else of the smallest larger size (whole,
    not split), else ``[end, end + length)`` when that ends within
    ``capacity``; None when none fits or ``used + length`` would exceed
    ``capacity``. ``free(entry)`` returns a slot to the list of its size,
    ``reset()`` forgets every slot (``high_water`` stays). ``used`` is the
    sum of the lengths taken and not freed, ``high_water`` its largest value
    since creation or ``reset_high_water()``. Costs O(distinct slot sizes)
    (one or two in a session). Not thread-safe: the save area's lock guards it.
    """

    cdef uint64_t _capacity
    cdef uint64_t _end
    cdef uint64_t _used
    cdef uint64_t _high_water
    cdef FreeList *_lists
    cdef size_t _nlists

    def __cinit__(self, capacity):
        cdef int64_t c_capacity = _i64(capacity)
        if c_capacity <= 0:
            raise _layout.ParameterError(f"slots need a capacity > 0 bytes, got {capacity}")
        self._capacity = <uint64_t>c_capacity

    def __dealloc__(self):
        cdef size_t i
        for i in range(self._nlists):
            free(self._lists[i].offsets)
        free(self._lists)

    cdef bint _take(self, uint64_t length, uint64_t *offset, uint64_t *slot) noexcept:
        cdef size_t i
        cdef size_t best = self._nlists
        cdef FreeList *found
        if self._used + length > self._capacity:
            return False
        for i in range(self._nlists):
            if self._lists[i].n and self._lists[i].size >= length and (
                    best == self._nlists or self._lists[i].size < self._lists[best].size):
                best = i
        if best < self._nlists:
            found = &self._lists[best]
            found.n -= 1
            offset[0] = found.offsets[found.n]
            slot[0] = found.size
        elif self._end + length <= self._capacity:
            offset[0] = self._end
            slot[0] = length
            self._end += length
        else:
            return False
        self._used += length
        if self._used > self._high_water:
            self._high_water = self._used
        return True

    cdef int _free(self, uint64_t offset, uint64_t slot, uint64_t length) except -1:
        cdef size_t i = 0
        cdef FreeList *lists
        cdef uint64_t *offsets
        while i < self._nlists and self._lists[i].size != slot:
            i += 1
        if i == self._nlists:
            lists = <FreeList *>realloc(self._lists, (i + 1) * sizeof(FreeList))
            if lists == NULL:
                raise MemoryError("cannot grow the save area's free lists")
            self._lists = lists
            memset(&lists[i], 0, sizeof(FreeList))
            lists[i].size = slot
            self._nlists += 1
        found = &self._lists[i]
        if found.n == found.cap:
            offsets = <uint64_t *>realloc(found.offsets, (found.cap * 2 + 16) * 8)
            if offsets == NULL:
                raise MemoryError("cannot grow the save area's free lists")
            found.offsets = offsets
            found.cap = found.cap * 2 + 16
        found.offsets[found.n] = offset
        found.n += 1
        self._used -= length
        return 0

    def take(self, length):
        """A slot for ``length`` bytes as ``(offset, slot, length)``; None when none fits."""
        cdef uint64_t offset, slot
        cdef int64_t c_length = _i64(length)
        if c_length <= 0 or not self._take(<uint64_t>c_length, &offset, &slot):
            return None
        return (offset, slot, c_length)

    def free(self, entry):
        """Return the slot of ``entry`` (as ``take`` gave it) to its free list."""
        offset, slot, length = entry
        self._free(<uint64_t>_i64(offset), <uint64_t>_i64(slot), <uint64_t>_i64(length))

    def reset(self):
        """Forget every slot: the next ``take`` starts at offset 0."""
        cdef size_t i
        for i in range(self._nlists):
            self._lists[i].n = 0
        self._end = 0
        self._used = 0

    @property
    def used(self):
        """Bytes taken and not freed."""
        return self._used

    @property
    def high_water(self):
        """The largest ``used`` since creation or the last ``reset_high_water``."""
        return self._high_water

    def reset_high_water(self):
        """Restart ``high_water`` from ``used``."""
        self._high_water = self._used


cdef class FileSave:
    """The COFW save of a session on a file (a ``FileLUN``) into an in-memory save area.

    Called with a write's COFW chunks (ascending) as ``write_through``'s
    ``save``, it does what the session's Python save does, without Python
    frames: under ``lock`` (the session's save lock) it returns at once when
    the bitmap is unmarked, skips chunks no longer flagged saved (sent since
    the write flagged them) and, under ``area_lock``, ``pread``s each
    chunk from the source's descriptor straight into a slot of ``arena``
    taken from ``slots`` and records it in ``index`` (chunk -> entry).
    Anything else (the source closed, a read that fails or comes back short,
    no slot, a chunk already held, the arena released by a closed area)
    stops it and hands that chunk and the rest, after both locks are
    released, to ``fallback`` (the session's Python save), which saves them
    or aborts the mark with the error's message. ``chunks`` and ``nbytes``
    count what it saved.
    """

    cdef DeltaBitmap _bitmap
    cdef object _source
    cdef object _lock, _unlock            # the session's save lock: acquire, release
    cdef object _area_lock, _area_unlock  # the save area's lock
    cdef Slots _slots
    cdef dict _index
    cdef object _arena
    cdef object _fallback
    cdef readonly uint64_t chunks
    cdef readonly uint64_t nbytes

    def __init__(self, DeltaBitmap bitmap not None, source, lock, Slots slots not None,
                 dict index not None, arena, area_lock, fallback):
        self._bitmap = bitmap
        self._source = source
        # Bound once: a with statement would look both methods up on every save.
        self._lock, self._unlock = lock.acquire, lock.release
        self._area_lock, self._area_unlock = area_lock.acquire, area_lock.release
        self._slots = slots
        self._index = index
        self._arena = arena
        self._fallback = fallback

    def __call__(self, chunks):
        cdef cnp.ndarray todo = np.ascontiguousarray(chunks, dtype=np.int64)
        self._save(<const int64_t *>cnp.PyArray_DATA(todo), <size_t>cnp.PyArray_SIZE(todo))

    cdef int _save(self, const int64_t *todo, size_t n) except -1:
        cdef size_t i = 0
        cdef DeltaBitmap bitmap = self._bitmap
        cdef uint64_t g = bitmap._granularity
        cdef uint64_t c, start, length, offset, slot
        cdef bint marked, flagged, read
        cdef bint held = False
        cdef int fd
        cdef Py_buffer arena
        self._lock()
        try:
            bitmap._acquire()
            marked = bitmap._marked
            bitmap._release()
            if not marked:
                return 0  # the mark was aborted meanwhile: nothing to protect
            fd = self._source._fd  # -1 once closed
            self._area_lock()
            try:
                try:
                    PyObject_GetBuffer(self._arena, &arena, PyBUF_WRITABLE)
                    held = True
                except ValueError:  # released: the area is closed
                    pass
                while held and fd >= 0 and i < n:
                    c = <uint64_t>todo[i]
                    bitmap._acquire()
                    flagged = bitmap._saved.words[c >> 6] >> (c & 63) & 1
                    bitmap._release()
                    if flagged:
                        start = c * g
                        length = min(g, bitmap._size - start)
                        if c in self._index or not self._slots._take(length, &offset, &slot):
                            break
                        read = offset + length <= <uint64_t>arena.len
                        if read:
                            with nogil:
                                read = _pread_all(fd, <char *>arena.buf + offset, length, start)
                        if not read:
                            self._slots._free(offset, slot, length)
                            break
                        self._index[c] = (offset, slot, length)
                        self.chunks += 1
                        self.nbytes += length
                    i += 1
            finally:
                if held:
                    PyBuffer_Release(&arena)
                self._area_unlock()
        finally:
            self._unlock()
        if i < n:
            self._fallback(_array(todo + i, n - i))
        return 0


cdef struct Piece:
    uint64_t offset             # where a chunk's data lies in the save area
    uint64_t length


cdef struct Group:
    size_t first                # the index of the group's first chunk
    uint64_t start              # its byte offset on the destination
    uint64_t nbytes
    char *data                  # the group's bytes, copied from the area
    Piece *pieces               # each chunk's place in the area


cdef class SavedWrite:
    """Writes a save area's saved chunks to a destination file with the GIL released.

    ``SavedWrite(index, area_lock, arena, fd, granularity, limit)`` serves
    one save area: ``index`` (chunk -> ``(offset, slot, length)``) and
    ``area_lock`` are the area's, ``arena`` is an in-memory area's buffer
    (None for a file area) and ``fd`` a file area's descriptor (-1 in
    memory). Chunks are ``granularity`` bytes; one write holds at most
    ``limit`` bytes.

    ``write(chunks, end, dest)``, with ``chunks`` (ascending) of a range
    ending at ``end`` whose source data was just copied to ``dest`` (a
    ``FileLUN``, written through its ``_write_fd``), writes every chunk
    held over it at ``chunk * granularity``: adjacent chunks in one
    ``pwrite``. For each write it takes ``area_lock``, looks the chunks up
    and copies them from their slots into a buffer of its own (``memcpy``
    from the arena, ``pread`` from a file area) with the GIL released,
    releases the lock, and writes the buffer with the GIL released: no slot
    is freed or reused, nor the area closed, while its data is copied, and a
    destination whose write hangs holds up no host write's COFW (rule 13).
    A chunk not held is skipped: flagged but not stored yet, it was not
    overwritten yet either. Anything but a plain success (``dest`` closed,
    the arena released, a chunk that does not end at ``min(its chunk's end,
    end)``, a read or write that fails or makes no progress) stops it before
    that chunk's write. Returns how many of ``chunks`` it handled: the
    caller does the rest its own way, and meets the error there.
    ``chunks``, ``nbytes`` and ``writes`` count what it wrote and in how many
    writes.
    """

    cdef dict _index
    cdef object _area_lock, _area_unlock  # the save area's lock: acquire, release
    cdef object _arena
    cdef int _fd
    cdef uint64_t _granularity
    cdef uint64_t _limit
    cdef size_t _most                     # chunks per write
    cdef readonly uint64_t chunks
    cdef readonly uint64_t nbytes
    cdef readonly uint64_t writes

    def __cinit__(self, dict index not None, area_lock, arena, int fd, granularity, limit):
        cdef int64_t g = _i64(granularity)
        cdef int64_t most = _i64(limit)
        if g <= 0 or most < g:
            raise _layout.ParameterError(
                f"a SavedWrite needs 0 < granularity <= limit, got {granularity} and {limit}")
        self._index = index
        self._area_lock, self._area_unlock = area_lock.acquire, area_lock.release
        self._arena = arena
        self._fd = fd
        self._granularity = <uint64_t>g
        self._limit = <uint64_t>most
        self._most = <size_t>(most // g)

    def __call__(self, chunks, end, dest):
        cdef cnp.ndarray todo = np.ascontiguousarray(chunks, dtype=np.int64)
        cdef const int64_t *c = <const int64_t *>cnp.PyArray_DATA(todo)
        cdef size_t n = <size_t>cnp.PyArray_SIZE(todo)
        cdef uint64_t stop = <uint64_t>_i64(end)
        cdef int out = dest._write_fd  # -1 once closed
        cdef size_t i = 0
        cdef size_t k
        cdef bint ok = True
        cdef Group group
        if out < 0 or n == 0:
            return 0
        group.data = <char *>malloc(<size_t>self._limit)
        group.pieces = <Piece *>malloc(self._most * sizeof(Piece))
        try:
            if group.data == NULL or group.pieces == NULL:
                raise MemoryError("cannot allocate the buffers of a SavedWrite")
            while ok and i < n:
                group.first = i
                self._area_lock()
                try:
                    k = self._gather(c, n, stop, &group)
                finally:
                    self._area_unlock()
                i = group.first  # past the chunks not held before the group
                if k:
                    with nogil:
                        ok = _pwrite_all(out, group.data, group.nbytes, group.start)
                else:
                    ok = False
                if ok:
                    i = group.first + k
                    self.chunks += k
                    self.nbytes += group.nbytes
                    self.writes += 1
        finally:
            free(group.data)
            free(group.pieces)
        return i

    cdef size_t _gather(self, const int64_t *c, size_t n, uint64_t stop,
                        Group *group) except? 0:
        """Copy the adjacent held chunks from ``c[group.first]`` on into ``group.data``,
        after moving ``group.first`` past the chunks not held before them; how many,
        0 when none is left or the next one cannot go. Called with the area's lock
        held."""
        cdef Py_buffer arena
        cdef bint memory = self._arena is not None
        cdef bint copied = True
        cdef size_t i = group.first
        cdef size_t k = 0
        cdef uint64_t g = self._granularity
        cdef uint64_t chunk, offset, length
        cdef uint64_t total = 0
        if memory:
            try:
                PyObject_GetBuffer(self._arena, &arena, PyBUF_SIMPLE)
            except ValueError:  # released: the area is closed
                return 0
        try:
            while i < n and k < self._most:
                chunk = <uint64_t>c[i]
                entry = self._index.get(chunk)
                if entry is None:
                    if k:
                        break
                    i += 1  # flagged, not stored yet: the source's data stands
                    group.first = i
                    continue
                offset, length = entry[0], entry[2]
                if k and (chunk * g != group.start + total or total + length > self._limit):
                    break
                if chunk * g >= stop or length != min(g, stop - chunk * g) or (
                        memory and offset + length > <uint64_t>arena.len):
                    break
                if k == 0:
                    group.start = chunk * g
                group.pieces[k].offset = offset
                group.pieces[k].length = length
                total += length
                k += 1
                i += 1
            if k:
                with nogil:
                    copied = self._copy(group, k, <char *>arena.buf if memory else NULL)
            group.nbytes = total
            return k if copied else 0
        finally:
            if memory:
                PyBuffer_Release(&arena)

    cdef bint _copy(self, Group *group, size_t k, const char *arena) noexcept nogil:
        """Copy the ``k`` pieces of ``group`` from the arena, or from the area's file when
        ``arena`` is NULL, into ``group.data``; False when a read fails."""
        cdef size_t j
        cdef uint64_t at = 0
        cdef uint64_t offset, length
        for j in range(k):
            offset = group.pieces[j].offset
            length = group.pieces[j].length
            if arena != NULL:
                memcpy(group.data + at, arena + offset, length)
            elif not _pread_all(self._fd, group.data + at, length, offset):
                return False
            at += length
        return True


cdef bint _pwrite_all(int fd, char *data, uint64_t length, uint64_t offset) noexcept nogil:
    """Write all ``length`` bytes at ``offset``; False on any error or no progress."""
    return _io_all(True, fd, data, length, offset)


cdef bint _pread_all(int fd, char *buffer, uint64_t length, uint64_t offset) noexcept nogil:
    """Read all ``length`` bytes at ``offset``; False on any error or end of file."""
    return _io_all(False, fd, buffer, length, offset)


cdef bint _io_all(bint write, int fd, char *buffer, uint64_t length,
                  uint64_t offset) noexcept nogil:
    cdef ssize_t got
    while length:
        if write:
            got = pwrite(fd, buffer, length, <off_t>offset)
        else:
            got = pread(fd, buffer, length, <off_t>offset)
        if got <= 0:
            return False
        buffer += got
        length -= <uint64_t>got
        offset += <uint64_t>got
    return True


# -- metadata I/O in one call --------------------------------------------------------

cdef extern from "<unistd.h>" nogil:
    int c_ftruncate "ftruncate"(int, off_t)
    int c_fsync "fsync"(int)
    int c_fdatasync "fdatasync"(int)

cdef extern from "<stdio.h>" nogil:
    int renameat(int, const char *, int, const char *)

cdef extern from "<errno.h>" nogil:
    int errno
    int EINTR
    int EIO

cdef enum:
    STEP_FTRUNCATE, STEP_PWRITE, STEP_FDATASYNC, STEP_FSYNC, STEP_RENAME

IO_FTRUNCATE, IO_PWRITE, IO_FDATASYNC, IO_FSYNC, IO_RENAME = (
    STEP_FTRUNCATE, STEP_PWRITE, STEP_FDATASYNC, STEP_FSYNC, STEP_RENAME)
_IO_NAMES = ("ftruncate", "pwrite", "fdatasync", "fsync", "rename")
_IO_ARITY = (3, 4, 2, 2, 4)

ctypedef struct IoStep:
    int kind
    int fd
    const char *old
    const char *new
    char *data
    uint64_t length
    uint64_t offset


def run_io(steps):
    """Run the system calls ``steps`` in order, the GIL released once for them all.

    Each step is a tuple: ``(IO_FTRUNCATE, fd, length)``, ``(IO_PWRITE, fd,
    data, offset)`` (``data`` any C-contiguous buffer, written whole),
    ``(IO_FDATASYNC, fd)``, ``(IO_FSYNC, fd)`` or ``(IO_RENAME, dir_fd, old,
    new)`` (``renameat`` inside one directory, names as bytes). A step
    interrupted by a signal is retried. Stops at the first step that fails
    and raises ``OSError`` (its errno; the step and its name or descriptor
    in the message): the steps before it are done, none after it. A
    malformed step raises ``ValueError`` or ``TypeError`` before any runs.

    One call instead of one per system call: each release and re-take of
    the GIL is a chance for a thread waiting for it to lose it again. The
    call yields the CPU between steps once 0.2 ms of them ran since it last
    did, so a thread waiting for it runs between long writes, and at its end,
    so one the release woke takes the GIL first.
    """
    steps = list(steps)
    cdef Py_ssize_t n = len(steps)
    cdef IoStep *plan = <IoStep *>calloc(n if n else 1, sizeof(IoStep))
    cdef Py_buffer *views = <Py_buffer *>calloc(n if n else 1, sizeof(Py_buffer))
    cdef Py_ssize_t i, held = 0
    cdef Py_ssize_t failed = -1
    cdef int err = 0
    cdef int64_t number
    cdef uint64_t since
    if plan == NULL or views == NULL:
        free(plan)
        free(views)
        raise MemoryError(f"cannot plan {n} I/O steps")
    try:
        for i in range(n):
            step = steps[i]
            kind = step[0] if type(step) is tuple and step else None
            if type(kind) is not int or not 0 <= kind < 5 or len(step) != _IO_ARITY[kind]:
                raise ValueError(f"I/O step {i} is malformed: {step!r}")
            plan[i].kind = kind
            plan[i].fd = step[1]
            if kind == IO_FTRUNCATE:
                number = _i64(step[2])
                if number < 0:
                    raise ValueError(f"I/O step {i}: a negative length {number}")
                plan[i].length = <uint64_t>number
            elif kind == IO_PWRITE:
                number = _i64(step[3])
                if number < 0:
                    raise ValueError(f"I/O step {i}: a negative offset {number}")
                plan[i].offset = <uint64_t>number
                PyObject_GetBuffer(step[2], &views[held], PyBUF_SIMPLE)
                held += 1
                plan[i].data = <char *>views[held - 1].buf
                plan[i].length = <uint64_t>views[held - 1].len
            elif kind == IO_RENAME:
                if not PyBytes_CheckExact(step[2]) or not PyBytes_CheckExact(step[3]):
                    raise TypeError(f"I/O step {i}: the names must be bytes")
                plan[i].old = <const char *>step[2]
                plan[i].new = <const char *>step[3]
        with nogil:
            since = _now_ns()
            for i in range(n):
                err = _run_step(&plan[i])
                if err:
                    failed = i
                    break
                _yield_due(&since)  # between long steps
            # A thread waiting for the GIL (a host writer) was woken as it was released:
            # let it run now, or this thread takes the GIL back first.
            sched_yield()
        if failed >= 0:
            step = steps[failed]
            what = step[2].decode(errors="replace") if step[0] == IO_RENAME else f"fd {step[1]}"
            raise OSError(err, f"{os_strerror(err)} ({_IO_NAMES[step[0]]} of {what}, "
                               f"step {failed} of {n})")
    finally:
        for i in range(held):
            PyBuffer_Release(&views[i])
        free(views)
        free(plan)


def region_records(regions):
    """The activity log's records of the ascending region indices ``regions``, as bytes.

    One record per run of consecutive regions: ``first`` u64, ``last`` u64 and
    the CRC-32 (zlib's) of those 16 bytes as u32, little-endian (the layout of
    ``isc.activity``). A checkpoint writes those of the regions it keeps hot
    before its freeze: from an int64 array (``keep_hot``'s), O(regions) in C
    with the GIL released, not a Python call per record.
    Raises ``ValueError`` for a negative region, ``TypeError`` for one that is
    not an integer.
    """
    if not (isinstance(regions, np.ndarray) and regions.dtype == np.int64):
        regions = np.array([_i64(region) for region in regions], dtype=np.int64)
    cdef const int64_t[::1] values = np.ascontiguousarray(regions)
    cdef Py_ssize_t n = values.shape[0]
    cdef Py_ssize_t i
    cdef int64_t first = 0, last = 0, region = 0
    cdef uint32_t crc
    cdef size_t at = 0
    if n == 0:
        return b""
    for i in range(n):
        if values[i] < 0:
            raise ValueError(f"region {values[i]} is negative")
    out = bytearray(n * 20)
    cdef unsigned char[::1] view = out
    cdef unsigned char *p = &view[0]
    with nogil:
        for i in range(n + 1):
            if i < n:
                region = values[i]
                if i and region == last + 1:
                    last = region
                    continue
            if i:
                memcpy(p + at, &first, 8)
                memcpy(p + at + 8, &last, 8)
                crc = isc_crc32(p + at, 16)
                memcpy(p + at + 16, &crc, 4)
                at += 20
            first = last = region
    return bytes(view[:at])


cdef int _run_step(IoStep *step) noexcept nogil:
    """Run one step whole; 0, or the errno of its failure."""
    cdef int rc
    cdef ssize_t got
    while True:
        if step.kind == STEP_FTRUNCATE:
            rc = c_ftruncate(step.fd, <off_t>step.length)
        elif step.kind == STEP_PWRITE:
            while step.length:
                got = pwrite(step.fd, step.data, step.length, <off_t>step.offset)
                if got < 0 and errno == EINTR:
                    continue
                if got <= 0:
                    return errno if got < 0 else EIO
                step.data += got
                step.length -= <uint64_t>got
                step.offset += <uint64_t>got
            return 0
        elif step.kind == STEP_FDATASYNC:
            rc = c_fdatasync(step.fd)
        elif step.kind == STEP_FSYNC:
            rc = c_fsync(step.fd)
        else:
            rc = renameat(step.fd, step.old, step.fd, step.new)
        if rc == 0:
            return 0
        if errno != EINTR:
            return errno
