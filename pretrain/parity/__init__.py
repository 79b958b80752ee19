"""Parity handlers for the pretraining fixtures of the official DINOv2 format (README of the fixtures).

Each handler recognises its file by keys (never by file name), rebuilds models and inputs from the file's own
config keys and compares every stored reference value; they are registered through
``dinoforge.pretrain.parity_cases.HANDLERS``.
"""
