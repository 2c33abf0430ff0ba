"""Studies built on at_jax, one folder each (its README: question, plan, results): they import at_jax,
never each other, and at_jax never imports them."""
