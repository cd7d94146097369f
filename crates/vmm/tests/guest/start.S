/* PVH entry of the tiny test guest: 32-bit protected mode, paging off, %ebx = start info. */
        .section .note.Xen, "a", @note
        .align 4
        .long 4                 /* name size */
        .long 4                 /* desc size */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .long _start
        .align 4

        .section .text.start, "ax"
        .code32
        .globl _start
_start:
        cli
        movl $stack_top, %esp
        pushl %ebx
        call guest_main
1:      hlt
        jmp 1b

        .globl triple_fault
triple_fault:
        lidt null_idt
        int3
        jmp triple_fault

        .section .rodata
null_idt:
        .word 0
        .long 0

        .section .bss
        .align 16
stack:  .space 65536
stack_top:

        .section .note.GNU-stack, "", @progbits
