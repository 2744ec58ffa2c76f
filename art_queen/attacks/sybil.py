"""
This module implements the Sybil attack `Sybil` against a per-client QUEEN.

With ``scope="per_client"`` QUEEN keeps one query state (class query sensitivities and records) per client id, so
that one attacker cannot push a class over the threshold for everyone. An attacker who can open many accounts
splits its queries over many ids; each id explores little, and few answers are reversed.

| Paper link: https://arxiv.org/abs/2407.01251
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from art_queen.attacks._common import AdaptiveExtractionAttack, check_positive_int

if TYPE_CHECKING:  # pragma: no cover
    from art.utils import CLASSIFIER_TYPE

logger = logging.getLogger(__name__)


def accepts_client_id(predict: Any) -> bool:
    """
    Tell whether a ``predict`` callable takes a ``client_id`` argument: named in its signature or in the signature
    of a function it wraps (``functools.wraps`` chain), not merely swallowed by ``**kwargs`` (ART's classifiers
    ignore unknown keyword arguments).

    :param predict: A bound ``predict`` method or a wrapper of one.
    :return: `True` if ``client_id`` is a named parameter somewhere along the chain.
    """
    seen: set[int] = set()
    function = predict
    while function is not None and id(function) not in seen:
        seen.add(id(function))
        try:
            if "client_id" in inspect.signature(function, follow_wrapped=False).parameters:
                return True
        except (TypeError, ValueError):
            pass
        function = getattr(function, "__wrapped__", None)
    return False


class Sybil(AdaptiveExtractionAttack):
    """
    Extraction attack that spreads its queries over ``n_clients`` client ids (``predict(x, client_id=...)``), each id
    asking a contiguous share of a random selection of the source samples, and trains the thieved classifier on all
    answers.

    If the victim's ``predict`` takes no ``client_id`` (the classifier has no client-scoped defence) the attack falls
    back to a single anonymous client and logs it; ``clients_used_`` then is 1.

    | Paper link: https://arxiv.org/abs/2407.01251
    """

    attack_params = AdaptiveExtractionAttack.attack_params + ["n_clients", "client_prefix"]

    def __init__(
        self,
        classifier: CLASSIFIER_TYPE,
        batch_size_fit: int = 64,
        batch_size_query: int = 256,
        nb_epochs: int = 30,
        nb_stolen: int = 1000,
        use_probability: bool = True,
        n_clients: int = 20,
        client_prefix: str = "sybil-",
        seed: int | None = 0,
        verbose: bool = False,
    ) -> None:
        """
        Create a Sybil attack.

        :param classifier: The victim classifier.
        :param batch_size_fit: Batch size for training the thieved classifier.
        :param batch_size_query: Rows per ``predict`` call to the victim.
        :param nb_epochs: Training epochs of the thieved classifier.
        :param nb_stolen: Query budget (rows sent to ``predict``, over all client ids).
        :param use_probability: Train on probability vectors; `False` trains on their top-1 labels.
        :param n_clients: Number of client ids to spread the queries over.
        :param client_prefix: Prefix of the client ids (``prefix + index``).
        :param seed: Seed of the query selection and training order.
        :param verbose: Show progress bars.
        """
        super().__init__(
            classifier,
            batch_size_fit=batch_size_fit,
            batch_size_query=batch_size_query,
            nb_epochs=nb_epochs,
            nb_stolen=nb_stolen,
            use_probability=use_probability,
            seed=seed,
            verbose=verbose,
        )
        self.n_clients = n_clients
        self.client_prefix = client_prefix
        self.clients_used_ = 0
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        check_positive_int("n_clients", self.n_clients)
        if not isinstance(self.client_prefix, str):
            raise ValueError(f"The parameter `client_prefix` must be a string, got {self.client_prefix!r}.")

    def extract(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> CLASSIFIER_TYPE:
        """
        Ask ``nb_stolen`` samples of ``x`` spread over ``n_clients`` client ids and train the thieved classifier.

        After the call: ``queries_used_`` (rows sent over all ids) and ``clients_used_`` (ids used; 1 if the victim
        takes no client id).

        :param x: Source samples of the attacker.
        :param y: Not used.
        :param thieved_classifier: A fresh, undefended ART ``PyTorchClassifier`` to train.
        :return: The trained thieved classifier.
        """
        if y is not None:
            logger.warning("This attack does not use the provided labels y.")
        x, thieved_classifier = self._start(x, kwargs)
        queries = x[self._draw(x, self.nb_stolen)]
        answers = self._ask_as_clients(queries)
        return self._train(thieved_classifier, queries, answers)

    def client_ids(self) -> list[str]:
        """
        The client ids this attack uses.

        :return: ``n_clients`` strings.
        """
        return [f"{self.client_prefix}{index}" for index in range(self.n_clients)]

    def _ask_as_clients(self, queries: np.ndarray) -> np.ndarray:
        if self.n_clients > 1 and not accepts_client_id(self.estimator.predict):
            logger.info(
                "The victim's predict takes no `client_id` (no client-scoped defence): the Sybil attack falls back to "
                "a single client."
            )
            self.clients_used_ = 1
            return self._query(queries)
        chunks = np.array_split(np.arange(len(queries)), min(self.n_clients, len(queries)))
        answers, used = [], 0
        for client_id, rows in zip(self.client_ids(), chunks):
            try:
                answers.append(self._query(queries[rows], description=f"Client {client_id}", client_id=client_id))
            except TypeError as error:
                if "client_id" not in str(error):
                    raise
                logger.info("The victim's predict rejected `client_id` (%s): falling back to a single client.", error)
                done = sum(len(part) for part in answers)
                answers.append(self._query(queries[done:]))
                used = max(used, 1)
                break
            used += 1
        self.clients_used_ = used
        return np.concatenate(answers)
