"""Position ids of compressed sequences."""

import re

import numpy as np
import pytest

from hypervocab.errors import ConfigError
from hypervocab.positions import position_ids


def test_base_and_compressed_positions_with_left_padding():
    lengths = np.array([[1, 1, 3, 2, 1], [1, 1, 1, 4, 1]])  # row 1 starts with two pads
    mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    # "base": a code sits at the base index of its last base token; padding is 0 and counts nothing
    assert position_ids(lengths, mask, "base").tolist() == [[0, 1, 4, 6, 7], [0, 0, 0, 4, 5]]
    assert position_ids(lengths, mask, "compressed").tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    # a cached step continues from what was already read
    assert position_ids(np.array([[2]]), np.array([[1]]), "base", base_offset=np.array([8])).tolist() == [[9]]
    assert position_ids(np.array([[2]]), np.array([[1]]), "compressed", code_offset=np.array([5])).tolist() == [[5]]
    with pytest.raises(ConfigError, match=re.escape("position mode must be 'base' or 'compressed', got 'rope'")):
        position_ids(lengths, mask, "rope")
