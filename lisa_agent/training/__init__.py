"""Training and fine-tuning LISA (LISA's recipe: CE + 2 x BCE + 0.5 x Dice)."""
