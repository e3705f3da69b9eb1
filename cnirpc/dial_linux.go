package cnirpc

import (
	"context"
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// dial connects to the Unix socket at path with plain blocking system
// calls. A plugin makes one exchange per exec, and in a fresh process the
// runtime's network poller costs more to set up and to wake than the
// exchange itself (about 0.3 ms here). ctx's deadline bounds every
// read, write and the connect; ctx's end shuts the connection down.
func dial(ctx context.Context, path string) (io.ReadWriteCloser, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	if deadline, ok := ctx.Deadline(); ok {
		tv := unix.NsecToTimeval(max(time.Until(deadline), time.Microsecond).Nanoseconds())
		for _, opt := range []int{unix.SO_RCVTIMEO, unix.SO_SNDTIMEO} {
			if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, opt, &tv); err != nil {
				unix.Close(fd)
				return nil, fmt.Errorf("socket timeout: %w", err)
			}
		}
	}
	if err := unix.Connect(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("connect %s: %w", path, err)
	}
	// A blocking descriptor: os.File reads and writes it directly,
	// without the poller.
	f := os.NewFile(uintptr(fd), path)
	c := &blockingConn{File: f}
	c.stop = context.AfterFunc(ctx, func() {
		if rc, err := f.SyscallConn(); err == nil {
			rc.Control(func(fd uintptr) { unix.Shutdown(int(fd), unix.SHUT_RDWR) })
		}
	})
	return c, nil
}

// blockingConn is a connected socket read and written with blocking
// system calls.
type blockingConn struct {
	*os.File
	stop func() bool
}

func (c *blockingConn) Close() error {
	c.stop()
	return c.File.Close()
}
