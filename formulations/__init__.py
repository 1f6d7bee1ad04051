"""Formulations: the maths of an alignment problem turned into a backend-neutral model and back.

Installed as ``alignment_solver.formulations``.  ``flow``: the min-cost circulation for count
loads without budgets, with its optimality certificate.  ``milp``: the general 0-1 program.
"""
