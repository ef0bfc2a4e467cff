"""Example task module: ship it with `taskfleet_tasks_files` (the local inventory does).

Every public function defined here becomes a task named after it:
    ./invoke submit count_primes --args "100000 200000"
"""


def count_primes(limit):
    """How many primes are below `limit` (a sieve: CPU and memory bound)."""
    if limit < 3:
        return 0
    sieve = bytearray([1]) * (limit // 2)  # odd numbers only
    for i in range(3, int(limit**0.5) + 1, 2):
        if sieve[i // 2]:
            sieve[i * i // 2::i] = bytes((limit - i * i - 1) // (2 * i) + 1)
    return sum(sieve)
