"""dinoforge.serve"""
