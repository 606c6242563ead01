"""Database URLs a user could mistype, each with a password whose two halves
must never be shown (tests/unit/test_url_masking.py, tests/e2e/test_hostile_urls.py)."""

# The password of each is made of these two halves, joined by what breaks it.
HALVES = ("SeKrit", "PaSS99")

HOSTILE = [
    "postgresql://root:SeKrit%zzPaSS99@127.0.0.1:1/x",       # not percent-encoding
    "postgresql://root:SeKrit/PaSS99@127.0.0.1:1/x",         # an unencoded /
    "postgresql://root:SeKritPaSS99@[::1/x",                 # an IPv6 host never closed
    "postgresql://root:SeKrit@PaSS99@127.0.0.1:1/x",         # an unencoded @
    "postgresql://root:SeKrit?PaSS99@127.0.0.1:1/x",
    "postgresql://root:SeKrit#PaSS99@127.0.0.1:1/x",
    "postgresql://root:SeKrit[PaSS99@127.0.0.1:1/x",
    "postgresql://root:SeKrit PaSS99@127.0.0.1:1/x",
    "postgresql://root:SeKrit%PaSS99@127.0.0.1:1/x",
    "postgresql://root:SeKrit%2FPaSS99@127.0.0.1:notaport/x",
    "postgresql://root@127.0.0.1:1/x?password=SeKrit%zzPaSS99",
    "postgresql://root@127.0.0.1:1/x?sslmode=disable&password=SeKrit&PaSS99",
    "postgresql://root@127.0.0.1:1/x?sslpassword=SeKrit/PaSS99&sslmode=disable",
    "host=127.0.0.1 port=1 user=root password='SeKrit PaSS99",
    "host=127.0.0.1 port=1 user=root password=SeKrit PaSS99",
    "host=127.0.0.1 port=1 user=root password = 'SeKrit\\' PaSS99' dbname=x",
]


def hidden(text: str) -> bool:
    """Neither half of the password is in ``text``."""
    return not any(half in text for half in HALVES)
