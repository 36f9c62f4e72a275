"""Training: the loop, recipes, adversarial crafting and lookahead."""
