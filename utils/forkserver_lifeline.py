"""Preloaded into multiprocessing's forkserver by ``utils.crf.CRFPool``: the forkserver dies with the process that
started it.

The forkserver is the parent of the DenseCRF workers, and they die with it (``utils.crf._init_worker``). Without this,
a tool that is SIGKILLed leaves the forkserver running, and with it every worker (see ``utils.crf.CRFPool``).
Importing this module gives the importing process that death signal, so nothing but the forkserver imports it.
"""

from utils.crf import die_with_parent

die_with_parent()
