//go:build !linux

package main

import (
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/overlaynet/overlay/cnirpc"
)

// errNotLinux is the answer of every verb that touches the kernel.
var errNotLinux = fmt.Errorf("overlay-cni runs only on Linux: %w", errors.ErrUnsupported)

// container stands for the container's network namespace.
type container struct{}

func openContainer(string) (*container, error) {
	return nil, types.NewError(types.ErrInternal, errNotLinux.Error(), "")
}

// Close does nothing.
func (*container) Close() {}

func attach(*NetConf, *skel.CmdArgs, *container, cnirpc.Attachment, func() error) (*current.Result, error) {
	return nil, types.NewError(types.ErrInternal, errNotLinux.Error(), "")
}

func checkNamespace(*container, *skel.CmdArgs, cnirpc.Attachment) error {
	return types.NewError(types.ErrInternal, errNotLinux.Error(), "")
}

func deleteHostVeth(string) error { return errNotLinux }

func deleteStaleVeths(string, map[string]bool) error { return errNotLinux }
