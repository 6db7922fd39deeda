"""Sweep files: each a `get_sweep(arg)` returning the runs of one study (`experiments.sweep`).

    python -m experiments.sweep --sweep=experiments/sweeps/degradation.py:preset=digits --root=DIR

degradation.py  plain vs residual nets at 20-110 layers (He et al. 2015, Fig. 6, Table 6)
shortcuts.py    shortcut options A, B, C at 20, 56 and 110 layers (Table 3's question on CIFAR)
preact.py       post- vs pre-activation blocks at 110 and 164 layers (He et al. 2016)
lr_depth.py     an example of a researcher's own sweep: learning rate x depth on digits
presets.py      the scales they run at (schedule, data, widths, seeds), not a sweep itself
"""
