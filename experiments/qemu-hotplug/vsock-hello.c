/* Guest side of the vsock hot-plug check: connect to the host (CID 2) on the
 * port given, send one line, print the reply. Retries the connect for 5 s. */
#include <linux/vm_sockets.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    unsigned port = argc > 1 ? (unsigned)atoi(argv[1]) : 1234;
    for (int i = 0; i < 100; i++) {
        int s = socket(AF_VSOCK, SOCK_STREAM, 0);
        if (s < 0) { perror("HP: socket"); return 1; }
        struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = 2, .svm_port = port };
        if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) {
            const char *msg = "hello-from-guest\n";
            if (write(s, msg, strlen(msg)) < 0) { perror("HP: write"); return 1; }
            char buf[128];
            ssize_t n = read(s, buf, sizeof buf - 1);
            if (n <= 0) { perror("HP: read"); return 1; }
            buf[n] = 0;
            printf("HP: vsock reply: %s", buf);
            return 0;
        }
        perror("HP: connect");
        close(s);
        usleep(50000);
    }
    return 1;
}
