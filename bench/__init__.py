"""`make bench`: Dorothy measured side by side with scp and rsync over a
throwaway sshd, on loopback, in one run (see bench/README.md)."""
