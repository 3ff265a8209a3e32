"""The optimizer: torch's AdamW update over paged state (paged_adamw.py), and the page pool that
moves optimizer state between the device and host memory (paging.py).

    from minilora.optim import PagedAdamW
"""

from minilora.optim.paged_adamw import PagedAdamW

__all__ = ["PagedAdamW"]
