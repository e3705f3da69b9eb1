package daemon

import (
	"errors"
	"fmt"
	"net"
	"syscall"
)

// netnsLock is held by a running overlayd for each network it serves: an
// abstract Unix socket, which the kernel keeps per network namespace and
// releases when the process dies, however it dies. It keeps a second
// overlayd, or a teardown, from touching the devices of a network that an
// overlayd in the same namespace is running, whatever their data
// directories and sockets.
type netnsLock struct{ l net.Listener }

// errLocked is returned by lockNetwork when an overlayd holds the lock.
var errLocked = errors.New("an overlayd serving this network is running in this network namespace")

// lockNetwork takes the lock of network name in the caller's network
// namespace, or fails wrapping errLocked.
func lockNetwork(name string) (*netnsLock, error) {
	// A leading "@" is Go's spelling of the abstract namespace.
	l, err := net.Listen("unix", "@overlayd/network/"+name)
	if errors.Is(err, syscall.EADDRINUSE) {
		return nil, fmt.Errorf("network %s: %w", name, errLocked)
	}
	if err != nil {
		return nil, fmt.Errorf("network %s: take the lock of the network namespace: %w", name, err)
	}
	return &netnsLock{l: l}, nil
}

// Unlock releases the lock.
func (k *netnsLock) Unlock() { k.l.Close() }
