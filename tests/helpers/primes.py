"""Python references for the sample primes release (releases/primes/primes.c), computed
independently of the C code."""

from __future__ import annotations

MASK64 = (1 << 64) - 1


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 2**64: independent of the C trial division."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    if n in small:
        return True
    if any(n % p == 0 for p in small):
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def count_primes_reference(start: int, end: int) -> bytes:
    """What ``primes:count_primes`` writes for the task ``START END``."""
    return f"{sum(1 for n in range(start, end) if is_prime(n))}\n".encode()


def iterated_hash_reference(start: int, end: int) -> bytes:
    """FNV-1a 64 over the 8 little-endian bytes of each n in [start, end)."""
    h = 0xCBF29CE484222325
    for n in range(start, end):
        for byte in n.to_bytes(8, "little"):
            h = ((h ^ byte) * 0x100000001B3) & MASK64
    return f"{h:016x}\n".encode()


def _sieve(n: int) -> bytearray:
    """Byte i is 1 when i < ``n`` is prime (Eratosthenes)."""
    sieve = bytearray([1]) * n
    sieve[:2] = b"\0\0"
    for i in range(2, int(n ** 0.5) + 1):
        if sieve[i]:
            sieve[i * i::i] = bytearray(len(range(i * i, n, i)))
    return sieve


def primes_below(n: int) -> int:
    """How many primes are below ``n``: what a count_primes job over 0:n adds up to."""
    return sum(_sieve(n))


def list_primes_output(n: int) -> bytes:
    """What a list_primes job over 0:n writes: each prime below ``n`` on a line, in order."""
    return "".join(f"{i}\n" for i, prime in enumerate(_sieve(n)) if prime).encode()
