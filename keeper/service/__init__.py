"""``keeper run`` as a service: the scheduler, systemd notification, the runtime that wires a
sweep's parts, and the state directory."""
