"""Driver-side plumbing: Ray start-up, resource pools (placement groups), worker groups and the
group factory. Nothing here runs inside a worker; worker classes arrive as arguments."""
