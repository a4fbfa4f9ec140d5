# Part of the compiled core, included by core.pyx:
# stable hashes of keys; the public mix64 / stable_hash / draw.
# Fields and cdef signatures are declared in core.pxd; the twin's namesakes are in twin.py.

# --------------------------------------------------------------------------- hashing and draws
cdef uint64_t hash_key(object s, object argument) except? 0:
    """stable_hash of a key from a public call: a str's UTF-8 bytes (read in place, no copy),
    bytes as they are, anything else as ``str(s)``. A str that is not valid UTF-8 (a lone
    surrogate) is an ArgumentError naming ``argument``; the pure-Python twin words it alike."""
    cdef const char* data
    cdef Py_ssize_t n
    if isinstance(s, str):
        data = utf8_and_size(s, &n)
        if data == NULL:
            PyErr_Clear()
            raise argument_error(argument, s, "valid UTF-8 text (no lone surrogates)")
        return mix64_c(fnv1a_c(data, n))
    if isinstance(s, bytes):
        data = <bytes>s
        return mix64_c(fnv1a_c(data, len(<bytes>s)))
    try:
        t = str(s)
    except Exception:
        raise argument_error(argument, s, "convertible to str") from None
    return hash_key(t, argument)


cdef uint64_t hash_str(object s) except? 0:
    return hash_key(s, "key")


def mix64(uint64_t x):
    """splitmix64 finaliser (exposed for tests and other-language ports)."""
    return mix64_c(x)


def stable_hash(s):
    """64-bit hash of a string's UTF-8 bytes: splitmix64(FNV-1a-64(bytes)). Same in every process."""
    return hash_str(s)


def draw(uint64_t hi, uint64_t lo, uint64_t seed):
    """The uniform number in [0, 1) a decision with event id (hi, lo) uses under a policy seed."""
    return draw_c(hi, lo, seed)
