/* Minimal /init for the raw-boot baseline: print a marker, end the VM. */
#include <string.h>
#include <sys/reboot.h>
#include <unistd.h>

int main(void)
{
	static const char marker[] = "VESSEL-RAW-INIT-MARKER\n";
	write(1, marker, strlen(marker));
	reboot(RB_AUTOBOOT);
	return 1;
}
