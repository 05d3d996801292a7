/* vsock-probe CID:PORT...: tries an AF_VSOCK stream connection to each
 * target, as a container attacking its agent or the host would, and prints
 * one line per target, `<cid>:<port> <verdict>`:
 *   socket-refused <errno>  socket(AF_VSOCK) failed (seccomp, no vsock)
 *   refused <errno>         connect failed or passed its 5 s deadline
 *   closed                  connected, then closed by the peer, no byte read
 *   OPEN                    connected and still open 3 s later
 *   ANSWERED                connected and the peer sent a byte
 * Targets are probed at once, one child each, so the lines come in any
 * order. For tests/tests/cri_sec_container_escape.rs. Built with
 * gcc -static: the busybox image has no libc. */
#include <errno.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <sys/socket.h>
#include <unistd.h>

static void probe(const char *target) {
  unsigned int cid, port;
  if (sscanf(target, "%u:%u", &cid, &port) != 2) {
    printf("%s bad-target\n", target);
    return;
  }
  int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    printf("%u:%u socket-refused %s\n", cid, port, strerror(errno));
    return;
  }
  struct sockaddr_vm addr = {
      .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port};
  int r = connect(fd, (struct sockaddr *)&addr, sizeof addr);
  if (r < 0 && errno == EINPROGRESS) {
    struct pollfd p = {.fd = fd, .events = POLLOUT};
    int err = 0;
    socklen_t len = sizeof err;
    if (poll(&p, 1, 5000) != 1) {
      err = ETIMEDOUT;
    } else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) {
      err = errno;
    }
    r = err ? -1 : 0;
    errno = err;
  }
  if (r < 0) {
    printf("%u:%u refused %s\n", cid, port, strerror(errno));
  } else {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    char byte;
    if (poll(&p, 1, 3000) != 1)
      printf("%u:%u OPEN\n", cid, port);
    else if (recv(fd, &byte, 1, 0) == 1)
      printf("%u:%u ANSWERED\n", cid, port);
    else
      printf("%u:%u closed\n", cid, port);
  }
  close(fd);
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: vsock-probe CID:PORT...\n");
    return 2;
  }
  for (int i = 1; i < argc; i++) {
    pid_t pid = fork();
    if (pid < 0) {
      perror("vsock-probe: fork");
      return 1;
    }
    if (pid == 0) {
      probe(argv[i]);
      fflush(stdout);
      _exit(0);
    }
  }
  while (wait(NULL) > 0)
    ;
  return 0;
}
