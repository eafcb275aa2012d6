# The thread state of an attached agent in static TLS (see crates/evolve-code/src/thread_state.rs).
#
# Assembled and linked by build.rs into a small shared object that the agent loads with
# `dlopen`. Its one thread-local is initial-exec (`@gottpoff`), so the object is flagged
# DF_STATIC_TLS and glibc places the block in its static-TLS surplus, at one offset from the
# thread pointer in every thread, or refuses the `dlopen` when the surplus is used up.

	.section .tbss,"awT",@nobits
	.p2align 6
	.hidden evolve_thread_state
	.type evolve_thread_state, @object
	.size evolve_thread_state, 64
evolve_thread_state:
	.zero 64

	.text
	.globl evolve_thread_state_offset
	.type evolve_thread_state_offset, @function
# Returns the block's offset from the thread pointer (the GOT word the dynamic linker filled).
evolve_thread_state_offset:
	movq evolve_thread_state@gottpoff(%rip), %rax
	ret
	.size evolve_thread_state_offset, .-evolve_thread_state_offset

	.section .note.GNU-stack,"",@progbits
