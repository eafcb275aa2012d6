/* A new implementation of hot_stress.c's `compute`, in a shared object loaded at run time. */
int compute_v3(int x) { return x * 3 + 3; }
