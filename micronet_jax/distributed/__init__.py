"""Several devices and hosts: the data-parallel mesh, the heartbeat watch that names a lost
process, the agreed stop on a preemption notice."""
