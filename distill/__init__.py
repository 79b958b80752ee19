"""dinoforge.distill"""
