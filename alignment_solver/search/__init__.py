"""The search for budgeted and weighted rounds, where no exact method finishes in time.

:mod:`.pipeline` runs the steps in order (the ``cpsat`` backend calls it):

- warm starts: :mod:`.prices` (Lagrangian prices on budgets, load rows or the load band),
  :mod:`.knapsack` (exact client knapsacks under band prices), :mod:`.rebalance` (a band repair
  by one min-cost flow on the experts), :mod:`.greedy` (the greedy completion);
- improvement steps: :mod:`.local` (ejection-cycle local search), :mod:`.submip` (CBC re-plans
  a set of freed clients), :mod:`.expert_lns` (CP-SAT re-plans every pair of a few experts);
- shared: :mod:`.values` (a plan's value), :mod:`.bands` (the load band under prices).

Imports run one way: backends -> search -> formulations / problem.  Nothing here imports a
backend; exact solves arrive as callables (:class:`.pipeline.Solvers`).
"""
