"""Reading compiled XLA programs in tests."""

import re


def ynnpack_convolutions(compiled) -> int:
    """How many of a compiled CPU program's convolutions XLA:CPU hands to YNNPACK: the fusions
    of kind ``__ynn_fusion`` whose computation holds a convolution."""
    text = compiled.as_text()
    ynn_computations = set(re.findall(r"calls=%?([\w.\-]+),[^\n]*__ynn_fusion", text))
    count = 0
    for block in text.split("\n\n"):  # one computation per block
        name = block.strip().split(" ", 1)[0].lstrip("%")
        count += name in ynn_computations and " convolution(" in block
    return count
