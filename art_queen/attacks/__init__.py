"""
QUEEN-aware model extraction attacks, as ART ``ExtractionAttack`` classes.

Each attack assumes what Kerckhoffs's principle allows: the attacker knows QUEEN's algorithm and public defaults,
not its fitted state, and talks to the victim only through ``predict``. Every attack also runs against undefended
classifiers and other defences.

- :class:`RepeatCompare`: asks queries again; answers that change between repeats were gradient-reversed.
- :class:`SparsityFilter`: reversed answers have exact zeros; drop them, train on them as wrong, or recover the label.
- :class:`CoreAvoidance`: shapes the queries (near-duplicates, off-core samples, mixups) so that few are recorded.
- :class:`Recovery`: emulates QUEEN on a proxy model and learns a map from defended back to clean answers (D-DAE).
- :class:`Sybil`: spreads the queries over many client ids against a per-client QUEEN.

| Paper link: https://arxiv.org/abs/2407.01251
"""

from art_queen.attacks.core_avoidance import CoreAvoidance
from art_queen.attacks.recovery import Recovery
from art_queen.attacks.repeat_compare import RepeatCompare
from art_queen.attacks.sparsity_filter import SparsityFilter
from art_queen.attacks.sybil import Sybil

__all__ = ["CoreAvoidance", "Recovery", "RepeatCompare", "SparsityFilter", "Sybil"]
