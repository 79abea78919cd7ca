"""Code the tests share across tiers (`from helpers.xxx import ...`; pytest.ini puts tests/ on sys.path).

Fixtures stay in each tier's conftest.py; what lives here is plain code: expected vector digests,
polling, fakes, and the harnesses that start a registry, containerd or a qemu guest.
"""
