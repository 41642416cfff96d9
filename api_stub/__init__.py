"""The thin HTTP endpoint: records sessions and kicks, publishes jobs by task name."""
