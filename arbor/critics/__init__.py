"""Critic models (value V(s), PRM, ORM). Not implemented yet: the search uses the `NodeScorer` stand-ins of
`arbor.mcts.scoring` until the critics issue lands (see DESIGN.md, "Critics")."""
