/*
 * Makes the guest's PID 1, the Vessel agent, exit: the fault suite's stand-in for
 * "SIGKILL of the agent" (crates/shim/tests/faults.rs). PID 1 ignores SIGKILL sent from
 * its own PID namespace, and the guest kernel has no magic SysRq, so a container in the
 * VM's PID namespace with CAP_SYS_PTRACE attaches to the agent, points its main thread
 * at an exit_group(9) system call and detaches. The guest kernel then panics ("Attempted
 * to kill init") and, with panic=-1, the VM ends, as it would if the agent crashed.
 * Built static by the test with the host's gcc and run inside the container.
 */
#include <stdio.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/user.h>
#include <sys/wait.h>

int main(void)
{
    const pid_t agent = 1;
    struct user_regs_struct r;
    int status;
    long word;

    if (ptrace(PTRACE_ATTACH, agent, 0, 0) != 0) {
        perror("kill-agent: ptrace attach to pid 1");
        return 1;
    }
    if (waitpid(agent, &status, __WALL) < 0) {
        perror("kill-agent: waitpid");
        return 1;
    }
    if (ptrace(PTRACE_GETREGS, agent, 0, &r) != 0) {
        perror("kill-agent: getregs");
        return 1;
    }
    /* Stopped in a system call, rip is just past its two-byte `syscall` (0f 05):
     * run it again. Otherwise write one at rip. */
    word = ptrace(PTRACE_PEEKTEXT, agent, (void *)(r.rip - 2), 0);
    if ((word & 0xffff) == 0x050f) {
        r.rip -= 2;
    } else {
        word = ptrace(PTRACE_PEEKTEXT, agent, (void *)r.rip, 0);
        word = (word & ~0xffffL) | 0x050f;
        if (ptrace(PTRACE_POKETEXT, agent, (void *)r.rip, (void *)word) != 0) {
            perror("kill-agent: poketext");
            return 1;
        }
    }
    r.orig_rax = -1; /* no system call restart */
    r.rax = 231;     /* exit_group */
    r.rdi = 9;
    if (ptrace(PTRACE_SETREGS, agent, 0, &r) != 0) {
        perror("kill-agent: setregs");
        return 1;
    }
    if (ptrace(PTRACE_DETACH, agent, 0, 0) != 0) {
        perror("kill-agent: detach");
        return 1;
    }
    puts("kill-agent: the agent is exiting");
    return 0;
}
