/*
 * The baseline /init for `make bench`: the same kernel, but userspace does
 * nothing except prove it ran and power off. Boot time to this line, versus
 * to the agent serving, is what our init work costs.
 *
 * Built with `gcc -static -Os`; no libc features beyond write/reboot.
 */
#include <fcntl.h>
#include <string.h>
#include <sys/reboot.h>
#include <unistd.h>

int main(void)
{
	static const char msg[] = "clh-bench-init: reached init\n";
	/* fd 1 is usually the console already; open it explicitly anyway, in
	 * case the kernel could not set up stdio. */
	int fd = open("/dev/console", O_WRONLY | O_NOCTTY);

	if (fd < 0)
		fd = 1;
	if (write(fd, msg, strlen(msg)) < 0) {
		/* Nothing to report to; power off regardless. */
	}
	sync();
	reboot(RB_POWER_OFF);
	/* PID 1 must never exit (kernel panic); park if power-off failed. */
	for (;;)
		pause();
}
