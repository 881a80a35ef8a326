"""Privacy attacks used to evaluate what the federated algorithms leak (pure code, no nvflare import).

:mod:`fedseg.attacks.idlg`: iDLG gradient inversion of one image and its mask from one local update, against a plain
FedAvg update, a CSAHE ring member's view and a DP-noised update (``fedseg attack idlg``).
"""

__all__ = ["idlg"]
