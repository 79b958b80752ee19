"""dinoforge.distill: compress a frozen teacher into smaller students with the pretraining machinery.

``dinoforge distill --config RECIPE`` (see ``docs/distill.md``): :mod:`.config` (recipe schema),
:mod:`.teacher` (frozen teacher from an artifact, an official ``.pth`` or a timm checkpoint),
:mod:`.students` (students, heads, adaptors), :mod:`.meta` (the shared-teacher step, head and feature modes),
:mod:`.grid` (teacher patch grid onto a student grid), :mod:`.feature_loss`, :mod:`.export` (student EMA
artifacts) and :mod:`.trainer` (the pretraining trainer driving all of it).
"""
