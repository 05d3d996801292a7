/* inotify-wait DIR NAME: watches DIR and prints NAME on a line each time an
 * entry NAME is created in or moved into it (the kubelet's `..data` swap).
 * Prints "ready" once the watch is in place. For the volume-sync test: the
 * busybox image has no inotify applet. Built with gcc -static. */
#include <stdio.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: inotify-wait DIR NAME\n");
    return 2;
  }
  int fd = inotify_init1(IN_CLOEXEC);
  if (fd < 0 || inotify_add_watch(fd, argv[1], IN_CREATE | IN_MOVED_TO) < 0) {
    perror("inotify-wait");
    return 1;
  }
  printf("ready\n");
  fflush(stdout);
  char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
  for (;;) {
    ssize_t n = read(fd, buf, sizeof buf);
    if (n <= 0) {
      perror("inotify-wait: read");
      return 1;
    }
    for (char *p = buf; p < buf + n;) {
      struct inotify_event *ev = (struct inotify_event *)p;
      if (ev->len > 0 && strcmp(ev->name, argv[2]) == 0) {
        printf("%s\n", ev->name);
        fflush(stdout);
      }
      p += sizeof *ev + ev->len;
    }
  }
}
