"""Expected logical-image hashes of the upstream vectors (shared/vectors/README.md)."""

L0_SHA = "d42a6fb743ce3e3eebdf0ad2560c98de47252c0f4d3a2b561509c34f82728892"
L01_SHA = "7d136d857b79c2979f663ea122311b599c9df0fa25a468f99d97fe6677c6eafa"
