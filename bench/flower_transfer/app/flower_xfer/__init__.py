"""A Flower app that moves one checkpoint-sized array from a SuperNode to the ServerApp."""
